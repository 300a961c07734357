"""provenance: what produced a result, as one record.

The ``provenance`` rule gathers the stage manifests (``llamapipe.core.manifest``) with the git
state, the resolved config, the image records and the resume promise the run had.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from llamapipe.core.atomic import write_json
from llamapipe.core.hashing import sha256_json
from llamapipe.core.manifest import now


def git_state(project_dir: str) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", project_dir, *args], capture_output=True, text=True, timeout=20)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _rehearsal(config: dict) -> dict | None:
    """rehearsal=cpu: what differed from a real NPU run, so no one mistakes it for one."""
    if not config.get("rehearsal"):
        return None
    from llamapipe.config.rehearsal import describe

    return {"mode": config["rehearsal"], "differences": describe(config)}


RESUME_EXACT = (
    "one process: the data order is a function of (seed, epoch), and model, optimizer, LR schedule "
    "and RNG come back from the checkpoint, so a resumed run ends byte-identical to a clean one "
    "(tests/test_exact_resume.py)"
)
RESUME_NOT_EXACT = (
    "upstream run_finetune.py: optimizer, LR schedule and RNG come back from the checkpoint and, on "
    "several cards, the data order is fixed per epoch; but collective reductions and device kernels "
    "are not bitwise deterministic, so a resumed run matches a clean one only up to floating-point "
    "noise (on one card the Trainer also draws the data order from the global RNG, so a resume "
    "after an epoch boundary sees another order)"
)


def resume_guarantee(config: dict) -> dict:
    """What "rerun after a crash" promises on this target, recorded so nobody assumes more."""
    exact = config["target"] == "cpu"
    return {"exact": exact, "why": RESUME_EXACT if exact else RESUME_NOT_EXACT}


def data_archive(config: dict, download: dict | None, project_dir: str) -> dict:
    """The archive the run trained on: the configured url and pin, and what download_data
    verified (its ``download.json`` beside the extracted files): the sha256 it computed, whether
    that was checked against a pin or trusted on first use, and the extracted files' md5s."""
    from llamapipe.stages.download import RECORD, pin_line, pin_yaml

    data = config["data"]
    seen: dict[str, Any] = {}
    for out in (download or {}).get("outputs", {}):
        path = Path(project_dir) / out / RECORD
        if path.is_file():
            seen = json.loads(path.read_text(encoding="utf-8"))
    pinned = data.get("sha256") is not None
    sha256 = seen.get("sha256", data.get("sha256"))
    return {
        "url": data["url"], "sha256": sha256, "pinned": pinned,
        "trust": "pinned" if pinned else "trusted on first use (sha256: null): pin it to check it on later runs",
        "pin": None if pinned or not sha256 else {
            "config.yaml": pin_yaml(seen.get("sha256_key", "data.sha256"), sha256),
            "--config": pin_line(seen.get("sha256_key", "data.sha256"), sha256)},
        "bytes": seen.get("bytes"), "md5": seen.get("md5"), "md5_checked": seen.get("md5_expected"),
        "verified_by": "download-data" if download else None,
    }


def collect(manifest_dirs: str, config: dict, project_dir: str, image_records: list[str], out: str) -> dict:
    """``manifest_dirs``: comma-separated; a variant's own directory comes after the plain run's
    (the stages it shares), and wins for a stage found in both."""
    manifests = {}
    for manifest_dir in manifest_dirs.split(","):
        for path in sorted(Path(manifest_dir).glob("*.json")):
            m = json.loads(path.read_text())
            manifests[m["stage"]] = m
    record = {
        "created": now(),
        "git": git_state(project_dir),
        "config": config,
        "config_sha256": sha256_json(config),
        "seed": config.get("seed"),
        "data_archive": data_archive(config, manifests.get("download-data"), project_dir),
        "images": {Path(p).stem: json.loads(Path(p).read_text()) for p in image_records if os.path.exists(p)},
        "rehearsal": _rehearsal(config),
        "resume": resume_guarantee(config),
        "stages": {
            name: {"started": m["started"], "finished": m["finished"], "environment": m["environment"],
                   "inputs": m["inputs"], "outputs": m["outputs"]}
            for name, m in manifests.items()
        },
    }
    write_json(out, record)
    return record
