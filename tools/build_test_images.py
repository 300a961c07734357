#!/usr/bin/env python3
"""Build the container test images locally: no image registry is needed (none is reachable here).

    DOCKER_HOST=unix:///path/to/sock python tools/build_test_images.py [--cache DIR] [--only base|cpu] [--force]

- ``llamapipe-test-base:bookworm``: ``debootstrap --variant=minbase`` of Debian bookworm (python3,
  python3-venv, ca-certificates, libgomp1 for paddle) from this machine's apt mirror, tarred and imported through the
  docker SDK. The rootfs tarball is kept in ``--cache`` (default ``$LLAMAPIPE_DOCKER_CACHE``).
- ``llamapipe-cpu:test``: ``docker/cpu-test/Dockerfile`` on that base: the pinned CPU stack
  (envs/requirements.txt + envs/constraints.txt) in /opt/venv, installed offline from wheels built
  on the host with ``pip wheel`` (bookworm's python3 is 3.11, the host's too: same cp311 tags).
  Built with the classic builder through the SDK, network off, progress streamed.

Each image carries the label ``llamapipe.test-image-hash``; an image whose label matches the
current inputs is reused, so a second run takes a second. Tests call ``ensure_base_image`` /
``ensure_cpu_image`` from a session fixture (tests/docker_engine.py).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BASE_TAG = "llamapipe-test-base:bookworm"
CPU_TAG = "llamapipe-cpu:test"
HASH_LABEL = "llamapipe.test-image-hash"
SUITE = "bookworm"
VARIANT = "minbase"
# libgomp1: the one system library paddle's libpaddle.so needs beyond what its wheel bundles.
INCLUDE = "python3,python3-venv,ca-certificates,libgomp1"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Dropped from the rootfs before import: package caches and lists (about 95 MB).
TRIM = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*")
BASE_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["/bin/bash"]',
]
CPU_DOCKERFILE_DIR = ROOT / "docker" / "cpu-test"
REQUIREMENTS = ROOT / "envs" / "requirements.txt"
CONSTRAINTS = ROOT / "envs" / "constraints.txt"

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """An image could not be built; the message says which step and why."""


class MissingTool(BuildError):
    """A host tool the build needs (debootstrap, tar) is not installed."""


def _print(msg: str) -> None:
    print(msg, flush=True)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (one-line or deb822 sources), else deb.debian.org."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
             *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        for line in text.splitlines():  # one-line format: deb [opts] URI SUITE COMPONENTS
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE and "security" not in m.group(1):
                return m.group(1)
        for stanza in re.split(r"\n\s*\n", text):  # deb822 format
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                for uri in fields.get("URIs", "").split():
                    if "security" not in uri:
                        return uri
    return DEFAULT_MIRROR


def base_hash() -> str:
    return _sha(SUITE.encode(), VARIANT.encode(), INCLUDE.encode(), repr(TRIM).encode(), repr(BASE_CHANGES).encode())


def cpu_hash(base_id: str) -> str:
    return _sha((CPU_DOCKERFILE_DIR / "Dockerfile").read_bytes(), REQUIREMENTS.read_bytes(),
                CONSTRAINTS.read_bytes(), base_id.encode())


def _image_with_hash(client: Any, tag: str, wanted: str) -> Any | None:
    import docker

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return image if (image.labels or {}).get(HASH_LABEL) == wanted else None


def _prune_superseded(client: Any, log: Log) -> None:
    """Remove our own untagged images (earlier builds whose tag moved on); other images are left alone."""
    import docker

    try:
        result = client.images.prune(filters={"dangling": True, "label": HASH_LABEL})
    except docker.errors.APIError as exc:
        log(f"could not prune superseded test images: {exc.explanation or exc}")
        return
    gone = [d.get("Deleted") for d in (result.get("ImagesDeleted") or []) if d.get("Deleted")]
    if gone:
        log(f"removed {len(gone)} superseded test image layer(s), {result.get('SpaceReclaimed', 0) / 1e6:.0f} MB")


def _prune_cache(cache_dir: Path | None, pattern: str, keep: str, log: Log) -> None:
    if cache_dir is None:
        return
    for path in Path(cache_dir).glob(pattern):
        if not path.name.startswith(keep):  # keeps the entry, its .partial and its build log
            log(f"removing stale cache entry {path}")
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()


def _run(cmd: list[str], log_path: Path, what: str) -> None:
    with open(log_path, "ab") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _unmount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys (or bind-mounts /dev where mknod is not allowed) inside
    the target and may leave them after a failure: unmount before deleting the tree."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4] for line in lines]
    for point in sorted((p for p in points if p.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def build_rootfs_tar(dest: Path, log: Log = _print) -> dict[str, float]:
    """debootstrap a minimal bookworm into a temp dir and tar it to ``dest`` (atomically)."""
    debootstrap = shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not debootstrap:
        raise MissingTool("debootstrap is not installed (apt-get install -y debootstrap)")
    tar = shutil.which("tar")
    if not tar:
        raise MissingTool("tar is not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    timings = {}
    with tempfile.TemporaryDirectory(prefix="lp-rootfs-", dir=dest.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        log_path = dest.parent / f"{dest.name}.debootstrap.log"
        log_path.write_text("")
        log(f"debootstrap --variant={VARIANT} --include={INCLUDE} {SUITE} {rootfs} {mirror} (log: {log_path})")
        t0 = time.monotonic()
        try:
            _run([debootstrap, f"--variant={VARIANT}", f"--include={INCLUDE}", SUITE, str(rootfs), mirror],
                 log_path, "debootstrap")
        finally:
            _unmount_under(rootfs)
        timings["debootstrap_s"] = time.monotonic() - t0
        for pattern in TRIM:
            for path in glob.glob(str(rootfs / pattern)):
                os.remove(path)
        t0 = time.monotonic()
        partial = dest.with_name(dest.name + ".partial")
        _run([tar, "-C", str(rootfs), "--numeric-owner", "--xattrs", "-cf", str(partial), "."], log_path, "tar")
        os.replace(partial, dest)
        timings["tar_s"] = time.monotonic() - t0
    log(f"rootfs tarball {dest} ({dest.stat().st_size / 1e6:.0f} MB) in {timings['debootstrap_s']:.0f} s")
    return timings


def _chunks(path: Path, size: int = 1 << 20):
    with open(path, "rb") as fh:
        while True:
            block = fh.read(size)
            if not block:
                return
            yield block


def ensure_base_image(client: Any, cache_dir: Path | None = None, force: bool = False,
                      log: Log = _print) -> dict[str, Any]:
    """``llamapipe-test-base:bookworm``, built unless an image with the current hash exists."""
    wanted = base_hash()
    image = None if force else _image_with_hash(client, BASE_TAG, wanted)
    if image is not None:
        return {"tag": BASE_TAG, "id": image.id, "built": False}
    timings: dict[str, float] = {}
    tmp = None
    if cache_dir is not None:
        tar_path = Path(cache_dir) / f"rootfs-{SUITE}-{wanted}.tar"
        _prune_cache(cache_dir, f"rootfs-{SUITE}-*.tar*", tar_path.name, log)
    else:
        tmp = tempfile.mkdtemp(prefix="lp-base-")
        tar_path = Path(tmp) / "rootfs.tar"
    try:
        if not tar_path.exists():
            timings.update(build_rootfs_tar(tar_path, log))
        else:
            log(f"using cached rootfs tarball {tar_path}")
        log(f"importing {tar_path} as {BASE_TAG}")
        t0 = time.monotonic()
        repo, tag = BASE_TAG.rsplit(":", 1)
        client.api.import_image_from_stream(_chunks(tar_path), repository=repo, tag=tag,
                                            changes=[*BASE_CHANGES, f"LABEL {HASH_LABEL}={wanted}"])
        timings["import_s"] = time.monotonic() - t0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    image = _image_with_hash(client, BASE_TAG, wanted)
    if image is None:
        raise BuildError(f"import finished but {BASE_TAG} with {HASH_LABEL}={wanted} is not on the engine")
    _prune_superseded(client, log)
    log(f"{BASE_TAG} {image.short_id}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {"tag": BASE_TAG, "id": image.id, "built": True, **timings}


def download_wheels(dest: Path, log: Log = _print) -> float:
    """``pip wheel`` the pinned CPU stack into ``dest`` (sdists are built into wheels here, so the
    image installs with ``--no-index``); returns seconds."""
    if dest.is_dir() and any(dest.glob("paddlepaddle-*.whl")):
        return 0.0
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"pip wheel -r {REQUIREMENTS.name} -c {CONSTRAINTS.name} -w {dest}")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-r", str(REQUIREMENTS), "-c", str(CONSTRAINTS),
                           "-w", str(partial)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"pip wheel of the CPU stack failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return time.monotonic() - t0


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        try:
            os.link(item, dst / item.name)
        except OSError:
            shutil.copy2(item, dst / item.name)


def ensure_cpu_image(client: Any, cache_dir: Path | None = None, force: bool = False,
                     log: Log = _print) -> dict[str, Any]:
    """``llamapipe-cpu:test`` on the base image, built unless one with the current hash exists."""
    base = ensure_base_image(client, cache_dir, log=log)
    wanted = cpu_hash(base["id"])
    image = None if force else _image_with_hash(client, CPU_TAG, wanted)
    if image is not None:
        return {"tag": CPU_TAG, "id": image.id, "built": False}
    timings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="lp-cpu-", dir=cache_dir))
    try:
        req_hash = _sha(REQUIREMENTS.read_bytes(), CONSTRAINTS.read_bytes())
        wheels = (Path(cache_dir) if cache_dir is not None else work) / f"wheels-{req_hash}"
        _prune_cache(cache_dir, "wheels-*", wheels.name, log)
        timings["pip_wheel_s"] = download_wheels(wheels, log)
        context = work / "context"
        context.mkdir()
        for name in ("Dockerfile", ".dockerignore"):
            shutil.copy2(CPU_DOCKERFILE_DIR / name, context / name)
        shutil.copy2(REQUIREMENTS, context / "requirements.txt")
        shutil.copy2(CONSTRAINTS, context / "constraints.txt")
        _link_tree(wheels, context / "wheels")
        log(f"building {CPU_TAG} from {CPU_DOCKERFILE_DIR / 'Dockerfile'} on {BASE_TAG} (network off)")
        t0 = time.monotonic()
        error = None
        for item in client.api.build(path=str(context), dockerfile="Dockerfile", tag=CPU_TAG, rm=True, forcerm=True,
                                     decode=True, network_mode="none", pull=False,
                                     buildargs={"BASE": BASE_TAG}, labels={HASH_LABEL: wanted}):
            if "stream" in item:
                text = item["stream"].rstrip("\n")
                if text.strip():
                    log(text)
            if "error" in item:
                error = item["error"]
        timings["build_s"] = time.monotonic() - t0
        if error:
            raise BuildError(f"building {CPU_TAG} failed: {error}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = _image_with_hash(client, CPU_TAG, wanted)
    if image is None:
        raise BuildError(f"build finished but {CPU_TAG} with {HASH_LABEL}={wanted} is not on the engine")
    _prune_superseded(client, log)
    log(f"{CPU_TAG} {image.short_id}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {"tag": CPU_TAG, "id": image.id, "built": True, **timings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default=os.environ.get("DOCKER_HOST"),
                   help="engine address, e.g. unix:///tmp/x/sock (default: DOCKER_HOST)")
    p.add_argument("--cache", default=os.environ.get("LLAMAPIPE_DOCKER_CACHE"),
                   help="keep the rootfs tarball and wheels here (default: LLAMAPIPE_DOCKER_CACHE)")
    p.add_argument("--only", choices=("base", "cpu"), help="build only this image (cpu implies base)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date image exists")
    args = p.parse_args(argv)
    import docker

    client = docker.DockerClient(base_url=args.host, timeout=900) if args.host else docker.from_env(timeout=900)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.monotonic()
        result = ensure_base_image(client, cache, force=args.force)
        _print(f"base: {result}")
        if args.only != "base":
            result = ensure_cpu_image(client, cache, force=args.force)
            _print(f"cpu: {result}")
        _print(f"done in {time.monotonic() - t0:.1f} s")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
