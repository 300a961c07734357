"""Stage manifests: what each stage read and wrote, with what, and when.

Every stage writes a manifest (``results/manifests/<stage>.json``, and ``manifest.json`` inside
a directory output) naming its inputs' fingerprints, its params hash, the versions of the Python
stack it ran with (inside the container on npu) and its start/end times; the ``provenance`` rule
(``llamapipe.stages.provenance``) gathers them. Python 3.9 compatible: it runs in the stage image.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from llamapipe.core.atomic import write_json
from llamapipe.core.hashing import sha256_file, sha256_json

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
