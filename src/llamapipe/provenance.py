"""What produced a result: per-stage manifests and the run's provenance record.

Every stage writes a manifest (``results/manifests/<stage>.json``, and ``manifest.json`` inside
a directory output) naming its inputs' fingerprints, its params hash, the versions of the Python
stack it ran with (inside the container on npu) and its start/end times. The ``provenance`` rule
gathers them with the git state, the resolved config and the image records.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from llamapipe.atomic import write_json
from llamapipe.hashing import sha256_file, sha256_json

FULL_HASH_LIMIT = 64 << 20  # larger files (model weights) get a sampled fingerprint: 13B weights
SAMPLE = 1 << 20            # are 26 GB, and a manifest must not cost minutes
STACK = ("paddlepaddle", "paddlenlp", "paddle-custom-npu", "numpy", "sentencepiece")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def fingerprint_file(path: Path) -> str:
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return "sha256:" + sha256_file(str(path))
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE))
        f.seek(size - SAMPLE)
        h.update(f.read(SAMPLE))
    return "sha256-sampled:" + h.hexdigest()


def fingerprint(path: str) -> str | None:
    """A file's hash; a directory's hash over its files (its own manifest.json and dotfiles such
    as Snakemake's .snakemake_timestamp excluded: they are not content)."""
    p = Path(path)
    if p.is_file():
        return fingerprint_file(p)
    if not p.is_dir():
        return None
    entries = sorted(
        (str(f.relative_to(p)), fingerprint_file(f)) for f in p.rglob("*")
        if f.is_file() and f.name != "manifest.json" and not f.name.startswith(".")
    )
    return "tree:" + sha256_json(entries)


def stack_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in STACK:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_stage_manifest(stage: str, inputs: dict[str, str], outputs: list[str], params: Any,
                         started: str, manifest_path: str | None) -> dict:
    manifest = {
        "stage": stage,
        "started": started,
        "finished": now(),
        "params_sha256": sha256_json(params),
        "inputs": {path: fingerprint(path) for path in inputs.values() if path},
        "outputs": {path: fingerprint(path) for path in outputs},
        "environment": stack_versions(),
        "host": platform.node(),
    }
    if manifest_path:
        write_json(manifest_path, manifest)
    for out in outputs:
        if os.path.isdir(out):
            write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


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
    from llamapipe.rehearsal import describe

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


def collect(manifest_dir: str, config: dict, project_dir: str, image_records: list[str], out: str) -> dict:
    manifests = {}
    for path in sorted(Path(manifest_dir).glob("*.json")):
        m = json.loads(path.read_text())
        manifests[m["stage"]] = m
    download = manifests.get("download-data", {})
    record = {
        "created": now(),
        "git": git_state(project_dir),
        "config": config,
        "config_sha256": sha256_json(config),
        "seed": config.get("seed"),
        "data_archive": {"url": config["data"]["url"], "sha256": config["data"]["sha256"],
                         "verified_by": "download-data" if download else None},
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
