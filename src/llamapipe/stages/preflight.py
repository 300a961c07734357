"""preflight: check the host before any heavy job and record what was found.

cpu: Python and the Paddle stack (installed versions, read without importing it), cores, memory,
free disk.
npu: the host checks of ``llamapipe.npu.ascend_checks`` (chip, device nodes, driver against the
pairing table, npu-smi and idle cards, shared memory, the model's source), the container engine,
free disk. Everything missing is listed at once, and the log shows one line per check, before an
image pull or a training job can fail hours in. ``results/preflight.json`` keeps what was found
(``hbm_gib_per_card`` feeds the plan rule). The image's own checks are rule preflight_image.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from typing import Any

from llamapipe.core.atomic import write_json
from llamapipe.core.cards import parse_cards
from llamapipe.core.errors import PipelineError

log = logging.getLogger("llamapipe.preflight")

# module -> distribution: what the cpu stages import, and the pip package that installs it
STACK = {"paddle": "paddlepaddle", "paddlenlp": "paddlenlp", "sentencepiece": "sentencepiece", "numpy": "numpy"}


def package_versions(names=STACK) -> dict[str, Any]:
    """Installed version of each module's distribution, without importing the stack.

    Importing Paddle + PaddleNLP only to prove they import cost this stage ~3 s and ~500 MiB
    (bench/RESULTS.md); the package metadata and the module's location (``find_spec`` of a
    top-level name runs none of its code) say whether it is installed. The first stage that
    computes (init_model) imports it for real.
    """
    import importlib.util
    from importlib import metadata

    found: dict[str, Any] = {}
    for module, dist in names.items():
        try:
            spec = importlib.util.find_spec(module)
            found[module] = metadata.version(dist) if spec is not None else None
        except (metadata.PackageNotFoundError, ImportError, ValueError) as exc:
            found[module] = None
            log.error("%s (%s) is not installed: %s", module, dist, exc)
        else:
            if found[module] is None:
                log.error("%s (%s) is not installed: no module %s", module, dist, module)
    return found


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def engine_version() -> tuple:
    """(version, problem): the Docker engine every NPU stage runs in."""
    from llamapipe.core.docker_engine import connect

    try:
        return connect(timeout=10).version().get("Version"), None
    except PipelineError as exc:
        return None, str(exc)


def npu_checks(params: dict, report: dict, problems: list) -> list:
    """The host's Ascend checks (``llamapipe.npu.ascend_checks``) and the container engine: the
    check records, their failures appended to ``problems``, what they read merged into ``report``.
    ``host_root``, ``lspci``, ``npu_smi`` and ``hub_endpoint`` in ``params`` point the checks at
    another tree, commands and model host (the tests' fake host)."""
    from llamapipe.npu import ascend_checks
    from llamapipe.npu.devices import NPU_CONTROL_DEVICES

    host = ascend_checks.Host(root=params.get("host_root") or "/", lspci=params.get("lspci", "lspci"),
                              npu_smi=params.get("npu_smi"), hub_endpoint=params.get("hub_endpoint"))
    wanted = parse_cards(params["devices"])
    model = params["model_name_or_path"]
    records, facts = ascend_checks.host_checks(host, {
        "cards": wanted, "dev_root": params["dev_root"], "ascend_root": params["ascend_root"],
        "control_devices": NPU_CONTROL_DEVICES, "pairing": params.get("pairing") or {},
        "shm_size": params.get("shm_size", "128g"), "sft_dtype": params.get("sft_dtype", ""),
        "model_name_or_path": model, "model_cache": params.get("model_cache"),
        "model_built": params.get("model_built", False)})
    report.update(facts)
    report.update({
        "pci_ascend_910": facts.get("pci", {}).get(ascend_checks.CHIP_PCI.get(
            (params.get("pairing") or {}).get("chip", "ascend910b"), ascend_checks.CHIP_PCI["ascend910b"]), 0),
        "cards_requested": wanted,
        # the host's own toolkit, if any: the stages use the image's (rule preflight_image checks it)
        "cann_version": ascend_checks.toolkit_info(host, params["ascend_root"])[1].get("version"),
    })
    version, problem = engine_version()
    report["engine_version"] = version
    records.append(ascend_checks.record("engine", "host", version or problem, not problem,
                                        problem or f"Docker engine {version}"))
    problems += [f"{r['name']}: {r['verdict']}" for r in ascend_checks.failed(records)]
    return records


def checkout_checks(checkout: str, report: dict, problems: list, pinned: str | None = None) -> None:
    """The PaddleNLP checkout the rehearsal runs: the scripts present, and at the pinned commit
    when it is a git clone (scripts of another commit need that commit's library)."""
    from llamapipe.npu.checkout import missing_files

    missing = missing_files(checkout)
    if missing:
        problems.append(f"PaddleNLP checkout {checkout} lacks {', '.join(missing)}")

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", checkout, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    # only the checkout's own repository counts (a plain copy inside another clone has none)
    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and os.path.realpath(top) == os.path.realpath(checkout) else None
    report["paddlenlp_checkout"] = {"path": checkout, "commit": commit or "unknown (not a git clone)"}
    if commit and pinned and not commit.startswith(pinned):
        problems.append(f"PaddleNLP checkout {checkout} is at {commit}, the config pins {pinned} "
                        f"(npu.image.paddlenlp_commit): check out the pinned commit")


def run(params: dict[str, Any], out_file: str, workdir: str = ".") -> dict[str, Any]:
    target = params.get("target", "cpu")
    free_gib = shutil.disk_usage(workdir).free / 2**30
    report: dict[str, Any] = {
        "target": target,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory_gib(), 1),
        "free_disk_gib": round(free_gib, 1),
    }
    problems: list[str] = []
    checks: list[dict] = []
    if free_gib < params["min_free_disk_gb"]:
        problems.append(f"only {free_gib:.1f} GiB free in {os.path.abspath(workdir)}, "
                        f"need {params['min_free_disk_gb']}")
    if params.get("paddlenlp_checkout"):
        checkout_checks(params["paddlenlp_checkout"], report, problems, params.get("paddlenlp_commit"))
    if target == "npu" and params.get("device", "npu") == "npu":
        checks = npu_checks(params, report, problems)  # the Paddle stack lives in the image, not on the host
        from llamapipe.npu.ascend_checks import record

        checks.append(record("disk", "host", f"{free_gib:.1f} GiB free", free_gib >= params["min_free_disk_gb"],
                             f"{free_gib:.1f} GiB free in {os.path.abspath(workdir)} (need "
                             f"{params['min_free_disk_gb']}; preflight.min_free_disk_gb)"))
    elif params.get("runtime") == "container":  # the rehearsal in the CPU stage image
        report["engine_version"], problem = engine_version()
        problems += [problem] if problem else []
    else:
        report["versions"] = package_versions()
        problems += [f"Python package {k} ({STACK[k]}) is not installed" for k, v in report["versions"].items()
                     if v is None]
    for key, value in report.items():
        if key != "npu_smi":  # its parsed table: in preflight.json
            log.info("%s: %s", key, value)
    if checks:
        from llamapipe.npu.ascend_checks import format_table

        log.info("host checks:\n%s", format_table(checks))
        report["checks"] = checks
    report["problems"] = problems
    if problems:
        raise PipelineError("preflight failed:\n  - " + "\n  - ".join(problems))
    write_json(out_file, report)
    return report
