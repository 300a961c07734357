"""Run one stage command inside a container, through the docker SDK (never the docker CLI).

    llamapipe container-run --spec '{"image": "...", "rule": "sft", "project": "..."}' -- CMD ARGS...
    python -m llamapipe.runners.container --spec @spec.json -- CMD ARGS...

What the runner guarantees (each is tested against a real engine in tests/test_container_runner.py):
- the engine is ``docker.from_env()`` (``DOCKER_HOST`` honoured); an unreachable engine is a
  ``PipelineError`` naming it; the image must already exist locally (never pulled implicitly);
- a container left by a crashed earlier run of the same rule (labels ``llamapipe.project`` and
  ``llamapipe.rule``) is removed first; Snakemake's directory lock rules out a live twin;
- devices are mapped at the same path (``rwm``), bind mounts honour ``read_only``, a mount that is
  or contains the engine's socket is refused (it would hand the stage root on the host);
- the container's combined stdout/stderr is streamed to ``out`` as it arrives (the rule's log
  grows while it runs); the return value is the container's exit code; the container is removed
  afterwards, also on errors;
- SIGINT/SIGTERM while it runs: the container is stopped (short timeout) and removed, then the
  process exits with 128 + signum. The handlers are installed only for the duration.

This module is imported on the host; it stays Python 3.9 compatible and imports the docker SDK
lazily, so importing it costs nothing where the SDK is absent.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
import signal
import stat
import sys
import threading
from dataclasses import asdict, dataclass, field, fields
from typing import Any, BinaryIO

from llamapipe.core.docker_engine import connect, engine_name
from llamapipe.core.errors import PipelineError

log = logging.getLogger(__name__)

LABEL_PROJECT = "llamapipe.project"
LABEL_RULE = "llamapipe.rule"
LABEL_STARTED = "llamapipe.started"

STOP_TIMEOUT = 5  # seconds between SIGTERM and SIGKILL when the runner is interrupted

# The engine's control sockets: mounting one (or a directory holding one) into a stage container
# gives that container root on the host.
ENGINE_SOCKETS = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/var/run/containerd/containerd.sock",
    "/run/containerd/containerd.sock",
)

_SHM_RE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?[bB]?$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]*$")


@dataclass
class ContainerSpec:
    """Where and how one rule's command runs; the command itself is passed separately.

    Construct with keywords. ``mounts`` are dicts ``{"source", "target", "read_only"}`` (bind
    mounts; ``read_only`` defaults to False); ``devices`` are host device paths, mapped to the same
    path inside with ``rwm``; ``user`` is ``"uid:gid"`` so files written to bind mounts belong to
    the invoking user (None: the image's user); ``shm_size`` like ``"128g"`` (None: the engine's
    64m default); ``network`` ``"none"`` by default, ``"host"`` on NPU machines as in the guide.
    """

    image: str
    rule: str
    project: str
    devices: list[str] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    privileged: bool = False
    network: str = "none"
    workdir: str | None = None
    user: str | None = None
    group_add: list[str] = field(default_factory=list)  # supplementary groups, e.g. the davinci nodes' gid
    # copied from the runner's environment at start (srun's per-task vars)
    pass_env: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("image", "rule", "project"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise PipelineError(f"container spec: {name!r} must be a non-empty string, got {value!r}")
        for name in ("rule", "project"):
            if not _LABEL_VALUE_RE.match(getattr(self, name)):
                raise PipelineError(f"container spec: {name} {getattr(self, name)!r} may hold only letters, "
                                    "digits and _.:@+- (it becomes a container label)")
        if not isinstance(self.devices, list) or not all(isinstance(d, str) and d.startswith("/")
                                                          for d in self.devices):
            raise PipelineError(f"container spec: devices must be a list of absolute paths, got {self.devices!r}")
        self.mounts = [_check_mount(m) for m in (self.mounts or [])]
        if not isinstance(self.env, dict):
            raise PipelineError(f"container spec: env must be an object of name: value, got {self.env!r}")
        env = {}
        for key, value in self.env.items():
            if not isinstance(key, str) or not key or "=" in key:
                raise PipelineError(f"container spec: bad environment variable name {key!r}")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise PipelineError(f"container spec: env {key} must be a string or number, got {value!r}")
            env[key] = str(value)
        self.env = env
        if self.shm_size is not None and not (isinstance(self.shm_size, str) and _SHM_RE.match(self.shm_size)):
            raise PipelineError(f"container spec: shm_size {self.shm_size!r} is not a size like '128g' or '512m'")
        if not isinstance(self.privileged, bool):
            raise PipelineError(f"container spec: privileged must be true or false, got {self.privileged!r}")
        if not isinstance(self.network, str) or not self.network:
            raise PipelineError("container spec: network must be a network name ('none', 'host'), "
                                f"got {self.network!r}")
        if self.workdir is not None and not (isinstance(self.workdir, str) and self.workdir.startswith("/")):
            raise PipelineError(f"container spec: workdir must be an absolute path, got {self.workdir!r}")
        if self.user is not None and not (isinstance(self.user, str)
                                          and re.match(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$", self.user)):
            raise PipelineError(f"container spec: user must be 'uid:gid' (or a name), got {self.user!r}")
        if not isinstance(self.group_add, list) or not all(isinstance(g, str) and re.match(r"^[A-Za-z0-9_.-]+$", g)
                                                            for g in self.group_add):
            raise PipelineError("container spec: group_add must be a list of group ids or names, "
                                f"got {self.group_add!r}")
        if not isinstance(self.pass_env, list) or not all(isinstance(n, str)
                                                           and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n)
                                                           for n in self.pass_env):
            raise PipelineError(f"container spec: pass_env must be a list of variable names, got {self.pass_env!r}")

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> ContainerSpec:
        """A spec from JSON text (or an already parsed object); unknown keys are an error."""
        if isinstance(text, dict):
            data = text
        else:
            try:
                data = json.loads(text)
            except (TypeError, ValueError) as exc:
                raise PipelineError(f"container spec is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PipelineError(f"container spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"container spec: unknown key(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        missing = [k for k in ("image", "rule", "project") if k not in data]
        if missing:
            raise PipelineError(f"container spec: missing {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _check_mount(mount: Any) -> dict[str, Any]:
    if not isinstance(mount, dict):
        raise PipelineError(f"container spec: a mount must be an object {{source, target, read_only}}, got {mount!r}")
    unknown = sorted(set(mount) - {"source", "target", "read_only"})
    if unknown:
        raise PipelineError(f"container spec: mount {mount!r} has unknown key(s) {', '.join(unknown)}")
    for key in ("source", "target"):
        value = mount.get(key)
        if not isinstance(value, str) or not value.startswith("/"):
            raise PipelineError(f"container spec: mount {key} must be an absolute path, got {value!r}")
    read_only = mount.get("read_only", False)
    if not isinstance(read_only, bool):
        raise PipelineError(f"container spec: mount read_only must be true or false, got {read_only!r}")
    return {"source": mount["source"], "target": mount["target"], "read_only": read_only}


def load_spec(value: str) -> ContainerSpec:
    """``--spec`` argument: JSON text, or ``@path/to/spec.json``."""
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read()
        except OSError as exc:
            raise PipelineError(f"cannot read container spec {path}: {exc}") from exc
    return ContainerSpec.from_json(value)


def project_id(project_dir: str) -> str:
    """A stable, label-safe id of a project directory: its name plus a hash of its real path."""
    real = os.path.realpath(project_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(real) or "root").strip("-.") or "project"
    return f"{name}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"


def _engine_sockets(client: Any = None) -> set[str]:
    paths = set(ENGINE_SOCKETS)
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        paths.add(host[len("unix://"):])
    adapter = getattr(getattr(client, "api", None), "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if isinstance(socket_path, str) and socket_path:
        paths.add(socket_path)
    return {os.path.realpath(p) for p in paths} | paths


def refuse_engine_socket_mounts(spec: ContainerSpec, client: Any = None) -> None:
    """A mount that is, or contains, the engine's socket gives the container root on the host."""
    sockets = _engine_sockets(client)
    for mount in spec.mounts:
        source = os.path.realpath(mount["source"])
        prefix = source.rstrip("/") + "/"
        for sock in sorted(sockets):
            if source == sock or sock.startswith(prefix):
                raise PipelineError(f"refusing to mount {mount['source']} into the container of rule {spec.rule}: "
                                    f"it is or contains the container engine's socket {sock}, which would give "
                                    "the stage root on the host")
        try:
            is_socket = stat.S_ISSOCK(os.stat(source).st_mode)
        except OSError:
            is_socket = False
        name = os.path.basename(source)
        if is_socket and ("docker" in name or "containerd" in name):
            raise PipelineError(f"refusing to mount {mount['source']} into the container of rule {spec.rule}: "
                                "it is a container engine socket")


def remove_stale_containers(client: Any, project: str, rule: str) -> list[str]:
    """Remove every container labelled with this project and rule (a crashed earlier run);
    returns their ids."""
    filters = {"label": [f"{LABEL_PROJECT}={project}", f"{LABEL_RULE}={rule}"]}
    removed = []
    for container in client.containers.list(all=True, filters=filters, ignore_removed=True):
        labels = container.labels or {}
        log.warning("removing stale container %s (%s, %s, started %s) left by an earlier run of rule %s",
                    container.short_id, container.name, container.status,
                    labels.get(LABEL_STARTED, "?"), rule)
        _remove(container)
        removed.append(container.id)
    return removed


def _remove(container: Any) -> None:
    import docker

    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code == 409 and "already in progress" in str(exc):
            return
        log.error("could not remove container %s: %s", container.short_id, exc)


def _container_name(spec: ContainerSpec, started: datetime.datetime) -> str:
    stamp = started.strftime("%Y%m%dT%H%M%S")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"llamapipe-{spec.rule}-{spec.project}")
    return f"{base}-{stamp}-{os.getpid()}"


def container_create_kwargs(spec: ContainerSpec, argv: list[str],
                            started: datetime.datetime | None = None) -> dict[str, Any]:
    """The keyword arguments for ``client.containers.create`` (pure: no engine involved)."""
    from docker.types import Mount

    if not argv:
        raise PipelineError(f"rule {spec.rule}: no command to run in the container")
    started = started or datetime.datetime.now(datetime.timezone.utc)
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": [str(a) for a in argv],
        "name": _container_name(spec, started),
        "labels": {
            LABEL_PROJECT: spec.project,
            LABEL_RULE: spec.rule,
            LABEL_STARTED: started.isoformat(timespec="seconds"),
        },
        "environment": {**spec.env, **{n: os.environ[n] for n in spec.pass_env if n in os.environ}},
        "devices": [f"{d}:{d}:rwm" for d in spec.devices],
        "mounts": [Mount(target=m["target"], source=m["source"], type="bind", read_only=m["read_only"])
                   for m in spec.mounts],
        "network_mode": spec.network,
        "privileged": spec.privileged,
        "stdin_open": False,
        "tty": False,
    }
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    if spec.workdir:
        kwargs["working_dir"] = spec.workdir
    if spec.user:
        kwargs["user"] = spec.user
    if spec.group_add:
        kwargs["group_add"] = list(spec.group_add)
    return kwargs


# --- running ------------------------------------------------------------------------------------

class _Interrupted(BaseException):
    """Raised by our signal handler to leave the blocking log stream (BaseException: library code
    that catches Exception must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGuard:
    """SIGINT/SIGTERM handlers for the duration of one run: the first signal raises
    ``_Interrupted`` while armed; later ones (during cleanup) are only recorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self.old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self.armed:
            self.armed = False
            raise _Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self.old[sig] = signal.signal(sig, self._handler)
        self.armed = True

    def restore(self) -> None:
        self.armed = False
        for sig, old in self.old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self.old = {}


def _binary(out: Any) -> Any:
    if isinstance(out, io.TextIOBase):
        out.flush()
        return out.buffer
    return out


def _require_image(client: Any, image: str) -> None:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound as exc:
        raise PipelineError(f"image {image} not found locally (build it with the build_image rule / load it); "
                            "the container runner never pulls") from exc
    except docker.errors.APIError as exc:
        raise PipelineError(f"cannot look up image {image} on the Docker engine: {exc.explanation or exc}") from exc


def run_in_container(spec: ContainerSpec, argv: list[str], out: BinaryIO | None = None, client: Any = None,
                     stop_timeout: float = STOP_TIMEOUT, stopped_exit: str = "signal") -> int:
    """Run ``argv`` in a fresh container described by ``spec``; stream its output to ``out``
    (default: this process's stdout) and return its exit code. See the module docstring.
    ``stopped_exit``: after SIGINT/SIGTERM, exit 128 + signum (``signal``: a stage that was
    interrupted did not succeed) or with the stopped container's own code (``container``: a
    server that drains on SIGTERM and exits 0, ``llamapipe serve`` on target npu)."""
    import docker
    import requests

    sink = _binary(out if out is not None else sys.stdout)
    kwargs = container_create_kwargs(spec, argv)
    client = client if client is not None else connect()
    refuse_engine_socket_mounts(spec, client)
    _require_image(client, spec.image)
    remove_stale_containers(client, spec.project, spec.rule)

    guard = _SignalGuard()
    container = None
    code: int | None = None
    stopped_code: int | None = None
    written = 0
    try:
        guard.install()
        try:
            container = client.containers.create(**kwargs)
        except docker.errors.ImageNotFound as exc:
            raise PipelineError(f"image {spec.image} not found locally (build it with the build_image rule / "
                                "load it)") from exc
        except docker.errors.APIError as exc:
            raise PipelineError(f"cannot create the container for rule {spec.rule}: {exc.explanation or exc}") from exc
        log.info("rule %s: container %s (%s) from %s: %s", spec.rule, container.short_id, container.name,
                 spec.image, " ".join(kwargs["command"]))
        try:
            container.start()
        except docker.errors.APIError as exc:
            raise PipelineError(f"cannot start the container for rule {spec.rule}: {exc.explanation or exc}") from exc
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            sink.write(chunk)
            sink.flush()
            written += len(chunk)
        result = container.wait()
        code = int(result.get("StatusCode", -1))
        if result.get("Error"):
            log.error("rule %s: engine reported %s", spec.rule, result["Error"])
        if code != 0:
            _explain_failure(container, spec, code)
        return code
    except requests.RequestException as exc:
        raise PipelineError(f"rule {spec.rule}: lost contact with the Docker engine at {engine_name()} "
                            f"while running the container: {exc}") from exc
    except docker.errors.APIError as exc:
        raise PipelineError(f"rule {spec.rule}: the Docker engine failed while running the container: "
                            f"{exc.explanation or exc}") from exc
    except _Interrupted as exc:
        log.warning("rule %s: received %s, stopping container %s", spec.rule, signal.Signals(exc.signum).name,
                    container.short_id if container is not None else "(not created)")
        if container is not None:
            try:
                # the engine takes whole seconds: `t=20.0` is refused (strconv.Atoi) and the stop then
                # fails, leaving the forced removal below to kill the stage without its SIGTERM
                container.stop(timeout=math.ceil(stop_timeout))
                # what the stage printed while stopping (its last words belong in the rule's log)
                tail = container.logs(stdout=True, stderr=True)[written:]
                if tail:
                    sink.write(tail)
                if stopped_exit == "container":
                    stopped_code = int(container.wait(timeout=10).get("StatusCode", -1))
            except (docker.errors.DockerException, requests.RequestException) as stop_exc:
                log.error("could not stop container %s: %s", container.short_id, stop_exc)
    finally:
        guard.armed = False
        try:
            if container is not None:
                _remove(container)
            else:
                # interrupted or failed while creating: whatever got created carries our labels
                remove_stale_containers(client, spec.project, spec.rule)
        except (requests.RequestException, docker.errors.DockerException) as exc:
            log.error("rule %s: could not remove its container (the next run removes it): %s", spec.rule, exc)
        finally:
            guard.restore()
            try:
                sink.flush()
            except (OSError, ValueError):
                pass
        if guard.signum is not None and not (stopped_exit == "container" and stopped_code is not None):
            raise SystemExit(128 + guard.signum)
    if stopped_code is not None:
        log.info("rule %s: the stopped container exited with %d", spec.rule, stopped_code)
        return stopped_code
    raise AssertionError("unreachable")  # pragma: no cover


def _explain_failure(container: Any, spec: ContainerSpec, code: int) -> None:
    try:
        container.reload()
        state = container.attrs.get("State", {})
    except Exception:  # the container may be gone already; this is only a hint
        return
    if state.get("OOMKilled"):
        log.error("rule %s: container was killed for lack of memory (OOM; exit %d)", spec.rule, code)
    elif code == 137:
        log.error("rule %s: container was killed (SIGKILL, exit 137)", spec.rule)


# --- CLI ------------------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, metavar="JSON|@FILE",
                   help="the ContainerSpec as JSON text, or @path/to/spec.json")
    p.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT,
                   help="seconds between SIGTERM and SIGKILL when interrupted (default %(default)s)")
    p.add_argument("--stopped-exit", choices=["signal", "container"], default="signal",
                   help="after SIGINT/SIGTERM exit 128+signum (signal, default), or with the stopped "
                        "container's own code (container: a server that stops gracefully)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run inside")


def add_container_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``container-run`` to a subparsers object; its handler is ``container_run_main``
    (set as ``handler``; it returns the exit code to exit with)."""
    p = subparsers.add_parser("container-run", help="run a command inside the stage container (docker SDK)",
                              description=__doc__.split("\n")[0])
    _add_arguments(p)
    p.set_defaults(handler=container_run_main)
    return p


def container_run_main(args: argparse.Namespace) -> int:
    """Handler of ``container-run``: returns the container's exit code; PipelineError on user errors."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise PipelineError("container-run: no command given (usage: container-run --spec JSON -- CMD ARGS...)")
    spec = load_spec(args.spec)
    return run_in_container(spec, argv, stop_timeout=args.stop_timeout, stopped_exit=args.stopped_exit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llamapipe.runners.container", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    from llamapipe.core.logs import configure_logging

    root = configure_logging()
    try:
        code = container_run_main(args)
    except PipelineError as exc:
        root.error("container-run failed: %s", exc)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
