"""preflight: check the host before any heavy job and record what was found.

On cpu: Python and the Paddle stack (versions as imported), cores, memory and free disk.
A problem that would fail a later stage hours in fails here, with what is missing.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from typing import Any

from llamapipe.atomic import write_json
from llamapipe.errors import PipelineError

log = logging.getLogger("llamapipe.preflight")

STACK = ("paddle", "paddlenlp", "sentencepiece", "numpy")


def package_versions(names=STACK) -> dict[str, Any]:
    import importlib

    found: dict[str, Any] = {}
    for name in names:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception as exc:  # report every missing piece, not just the first
            found[name] = None
            log.error("cannot import %s: %s", name, exc)
    return found


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def run(params: dict[str, Any], out_file: str, workdir: str = ".") -> dict[str, Any]:
    versions = package_versions()
    free_gib = shutil.disk_usage(workdir).free / 2**30
    problems: list[str] = [f"Python package {k} does not import" for k, v in versions.items() if v is None]
    if free_gib < params["min_free_disk_gb"]:
        problems.append(f"only {free_gib:.1f} GiB free in {os.path.abspath(workdir)}, need {params['min_free_disk_gb']}")
    expected = params.get("expected_versions") or {}
    for name, want in expected.items():
        if versions.get(name) not in (None, want):
            problems.append(f"{name} {versions[name]} found, the pinned stack expects {want}")
    report = {
        "target": "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "free_disk_gib": round(free_gib, 1),
        "versions": versions,
        "problems": problems,
    }
    for key in ("python", "cpu_count", "memory_gib", "free_disk_gib"):
        log.info("%s: %s", key, report[key])
    log.info("versions: %s", versions)
    if problems:
        raise PipelineError("preflight failed:\n  - " + "\n  - ".join(problems))
    write_json(out_file, report)
    return report
