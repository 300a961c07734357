"""A real Docker engine for the container tests: Debian's dockerd on a private socket.

Registered once for all test modules in tests/conftest.py:

    from docker_engine import base_image, cpu_image, docker_engine  # noqa: F401  (fixtures)

``docker_engine`` (session) starts

    dockerd --data-root D --exec-root E -H unix://SOCK --iptables=false --ip6tables=false
            --bridge=none --storage-driver=DRIVER --pidfile P

DRIVER comes from ``LLAMAPIPE_DOCKER_STORAGE_DRIVER``: ``auto`` (default) tries ``overlay2`` and
falls back to ``vfs`` when dockerd refuses it (e.g. on an overlay root file system); ``vfs`` or
``overlay2`` force one. On this machine's ext4 overlay2 works and creates a container in 0.01 s
where vfs copies the whole image (1.6 s for the 170 MB base, 15-30 s for the 2 GB CPU image).

waits until it answers a ping, yields a ``DockerEngine`` (``.host`` for DOCKER_HOST, ``.client``),
and at the end stops it by PID (SIGTERM, SIGKILL after a timeout) and removes the exec-root.
When dockerd is missing or does not come up, the tests skip with the reason and dockerd's log tail.

``LLAMAPIPE_DOCKER_CACHE=DIR`` keeps the data-root (hence the built images), the debootstrap
rootfs tarball and the CPU wheels in DIR across runs; unset, everything lives in a temp dir and
the images are built anew (base ~40 s, cpu image ~3-4 min). A lock file in DIR serialises
sessions that share it. ``base_image`` / ``cpu_image`` (session) build the test images with
tools/build_test_images.py unless up to date.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ci_policy import unavailable
from daemons import pid_alive, stop_process

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CACHE_ENV = "LLAMAPIPE_DOCKER_CACHE"
DRIVER_ENV = "LLAMAPIPE_DOCKER_STORAGE_DRIVER"


@dataclass
class DockerEngine:
    host: str  # unix://... : the value for DOCKER_HOST
    client: Any  # docker.DockerClient bound to this engine
    pid: int
    data_root: Path
    exec_root: Path
    log_path: Path
    cache_dir: Path | None  # persistent cache (LLAMAPIPE_DOCKER_CACHE) or None
    storage_driver: str = "vfs"

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with DOCKER_HOST pointing at this engine (for subprocesses)."""
        return {**os.environ, "DOCKER_HOST": self.host, **extra}


def _log_tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"




def start_engine(base: Path, data_root: Path, cache_dir: Path | None,
                 storage_driver: str = "vfs") -> tuple[DockerEngine, subprocess.Popen]:
    """Start dockerd under ``base`` (short paths: unix sockets are limited to 108 bytes).
    Raises ``RuntimeError`` with the reason and dockerd's log tail if it does not come up."""
    import docker

    dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not dockerd:
        raise FileNotFoundError("dockerd is not installed (apt-get install -y docker.io)")
    exec_root, sock, pidfile, log_path = base / "x", base / "sock", base / "pid", base / "dockerd.log"
    exec_root.mkdir(parents=True, exist_ok=True)
    data_root.mkdir(parents=True, exist_ok=True)
    if len(str(exec_root / "containerd" / "containerd.sock.ttrpc")) > 100:
        raise RuntimeError(f"exec-root {exec_root} is too long for unix socket paths")
    for leftover in (sock, pidfile):  # from an earlier attempt with another storage driver
        leftover.unlink(missing_ok=True)
    cmd = [dockerd, "--data-root", str(data_root), "--exec-root", str(exec_root), "-H", f"unix://{sock}",
           "--iptables=false", "--ip6tables=false", "--bridge=none", f"--storage-driver={storage_driver}",
           "--pidfile", str(pidfile)]
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "NOTIFY_SOCKET")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    host = f"unix://{sock}"
    deadline = time.monotonic() + START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _stop_containerd(exec_root)
            _unmount_under(exec_root, data_root)
            raise RuntimeError(f"dockerd exited with code {proc.returncode} while starting; "
                               f"log tail:\n{_log_tail(log_path)}")
        if sock.exists():
            try:
                client = docker.DockerClient(base_url=host, timeout=300)
                client.ping()
                engine = DockerEngine(host=host, client=client, pid=proc.pid, data_root=data_root,
                                      exec_root=exec_root, log_path=log_path, cache_dir=cache_dir,
                                      storage_driver=storage_driver)
                return engine, proc
            except Exception as exc:  # not up yet
                last_error = exc
        time.sleep(0.25)
    stop_process(proc, STOP_TIMEOUT)
    _stop_containerd(exec_root)
    _unmount_under(exec_root, data_root)
    raise RuntimeError(f"dockerd did not answer a ping within {START_TIMEOUT:.0f} s ({last_error}); "
                       f"log tail:\n{_log_tail(log_path)}")


def _stop_containerd(exec_root: Path) -> None:
    """dockerd stops the containerd it started; after a SIGKILL or a failed start it may not, so
    end that one by its recorded id."""
    try:
        pid = int((exec_root / "containerd" / "containerd.pid").read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"containerd" not in cmdline or str(exec_root).encode() not in cmdline:
        return  # not ours (the pid was reused)
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not pid_alive(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _unmount_under(*roots: Path) -> None:
    """Mounts dockerd left under our directories (a failed start leaves the data-root bind-mounted
    onto itself); deepest first."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(r) or point.startswith(str(r) + "/") for r in roots):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def stop_engine(engine: DockerEngine, proc: subprocess.Popen) -> None:
    try:
        engine.client.close()
    except Exception:
        pass
    stop_process(proc, STOP_TIMEOUT)
    _stop_containerd(engine.exec_root)
    _unmount_under(engine.exec_root, engine.data_root)


def _stop_leftover_engine(cache_dir: Path) -> None:
    """A dockerd this fixture started on the shared data-root in a session that was killed before
    its teardown (its pid is recorded in the cache): stop it, or two engines would share one root."""
    pidfile = cache_dir / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if cmdline and cmdline[0].endswith(b"dockerd") and str(cache_dir / "data-root").encode() in cmdline:
        os.kill(pid, signal.SIGTERM)
        for _ in range(int(STOP_TIMEOUT * 10)):
            if not pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    cache_env = os.environ.get(CACHE_ENV)
    cache_dir = Path(cache_env).resolve() if cache_env else None
    lock_fh = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_fh = open(cache_dir / "engine.lock", "w")
        fcntl.flock(lock_fh, fcntl.LOCK_EX)  # one engine per data-root at a time
        _stop_leftover_engine(cache_dir)
    base = Path(tempfile.mkdtemp(prefix="lpd", dir="/tmp"))  # short: socket paths max 108 bytes
    data_root = cache_dir / "data-root" if cache_dir is not None else base / "data"
    try:
        wanted = os.environ.get(DRIVER_ENV, "auto")
        drivers = ["overlay2", "vfs"] if wanted == "auto" else [wanted]
        failures = []
        for driver in drivers:
            try:
                engine, proc = start_engine(base, data_root, cache_dir, driver)
                break
            except FileNotFoundError as exc:
                unavailable(f"no Docker engine for the container tests: {exc}")
            except (RuntimeError, ImportError) as exc:
                failures.append(f"--storage-driver={driver}: {exc}")
        else:
            unavailable("no Docker engine for the container tests: " + "\n".join(failures))
        print(f"[docker engine] dockerd {engine.host} storage driver {driver}, data-root {data_root}", flush=True)
        if cache_dir is not None:
            (cache_dir / "dockerd.pid").write_text(f"{proc.pid}\n")
        try:
            yield engine
        finally:
            stop_engine(engine, proc)
            if cache_dir is not None:
                (cache_dir / "dockerd.pid").unlink(missing_ok=True)
    finally:
        shutil.rmtree(base / "x", ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        if lock_fh is not None:
            lock_fh.close()


def _build_tool():
    spec = importlib.util.spec_from_file_location("build_test_images", ROOT / "tools" / "build_test_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure(engine: DockerEngine, which: str) -> dict:
    tool = _build_tool()
    ensure = tool.ensure_base_image if which == "base" else tool.ensure_cpu_image
    cache = engine.cache_dir
    try:
        result = ensure(engine.client, cache, log=lambda msg: print(f"[{which} image] {msg}", flush=True))
    except tool.MissingTool as exc:
        unavailable(f"cannot build the {which} test image: {exc}")
    except tool.BuildError as exc:
        pytest.fail(f"building the {which} test image failed: {exc}")
    if result.get("built"):
        timings = ", ".join(f"{k}={v:.1f}" for k, v in result.items() if k.endswith("_s"))
        print(f"[{which} image] built {result['tag']}: {timings}", flush=True)
    return result


@pytest.fixture(scope="session")
def base_image(docker_engine) -> str:
    """Tag of the small Debian bookworm base image (python3 only), built if needed."""
    return _ensure(docker_engine, "base")["tag"]


@pytest.fixture(scope="session")
def cpu_image(docker_engine) -> str:
    """Tag of the CPU stage image (pinned Paddle stack in /opt/venv), built if needed."""
    return _ensure(docker_engine, "cpu")["tag"]


def main(argv: list[str] | None = None) -> int:
    """By hand: start the private engine, print its DOCKER_HOST, optionally build the test images,
    and keep it up until Ctrl-C / SIGTERM (then stop it like the fixture does)."""
    import argparse

    p = argparse.ArgumentParser(description="start the container tests' private dockerd")
    p.add_argument("--cache", default=os.environ.get(CACHE_ENV),
                   help=f"persistent data-root and build cache (default: ${CACHE_ENV}; else a temp dir)")
    p.add_argument("--driver", default=os.environ.get(DRIVER_ENV, "auto"), help="overlay2, vfs or auto")
    p.add_argument("--build", action="store_true", help="build the base and CPU test images, then stay up")
    args = p.parse_args(argv)
    cache_dir = Path(args.cache).resolve() if args.cache else None
    lock_fh = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_fh = open(cache_dir / "engine.lock", "w")
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another engine (a test session?) is using {cache_dir}")
            return 1
        _stop_leftover_engine(cache_dir)
    base = Path(tempfile.mkdtemp(prefix="lpd", dir="/tmp"))
    data_root = cache_dir / "data-root" if cache_dir is not None else base / "data"
    errors = []
    for driver in (["overlay2", "vfs"] if args.driver == "auto" else [args.driver]):
        try:
            engine, proc = start_engine(base, data_root, cache_dir, driver)
            break
        except (FileNotFoundError, RuntimeError) as exc:
            errors.append(str(exc))
    else:
        shutil.rmtree(base, ignore_errors=True)
        print("\n".join(errors))
        return 1
    if cache_dir is not None:
        (cache_dir / "dockerd.pid").write_text(f"{proc.pid}\n")
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        print(f"export DOCKER_HOST={engine.host}   # dockerd pid {engine.pid}, {engine.storage_driver}, "
              f"data-root {data_root}, log {engine.log_path}", flush=True)
        if args.build:
            tool = _build_tool()
            tool.ensure_cpu_image(engine.client, cache_dir)
        print("up; Ctrl-C stops it", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        stop_engine(engine, proc)
        shutil.rmtree(base, ignore_errors=True)
        if cache_dir is not None:
            (cache_dir / "dockerd.pid").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
