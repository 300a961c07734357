"""The container runner against a real Docker engine (Debian's dockerd on a private socket).

Most tests use the small locally built base image (Debian bookworm + python3); one uses the CPU
stage image. The NPU device tests run without Ascend hardware: fake /dev and driver trees in a
temp dir (``*_fake_devices_no_ascend_hardware``).
"""
# ruff: noqa: F811  (the fixtures imported from docker_engine are test arguments of the same name)

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ci_policy import unavailable
from llamapipe.core.errors import PipelineError
from llamapipe.npu.devices import NPU_CONTROL_DEVICES, device_nodes, driver_mounts
from llamapipe.runners.container import (
    LABEL_PROJECT,
    LABEL_RULE,
    LABEL_STARTED,
    ContainerSpec,
    add_container_run_parser,
    connect,
    container_create_kwargs,
    container_run_main,
    load_spec,
    project_id,
    refuse_engine_socket_mounts,
    run_in_container,
)

pytestmark = [pytest.mark.container]

ROOT = Path(__file__).resolve().parents[1]


def _project() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _spec(image: str, rule: str = "stage", **kw) -> ContainerSpec:
    return ContainerSpec(image=image, rule=rule, project=kw.pop("project", None) or _project(), **kw)


def _ours(client, spec: ContainerSpec) -> list:
    filters = {"label": [f"{LABEL_PROJECT}={spec.project}", f"{LABEL_RULE}={spec.rule}"]}
    return client.containers.list(all=True, filters=filters)


def _wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class _Runner(threading.Thread):
    """run_in_container in a thread (no signal handlers there), result kept."""

    def __init__(self, spec, argv, out, client):
        super().__init__(daemon=True)
        self.args = (spec, argv, out, client)
        self.code = None
        self.error = None

    def run(self):
        spec, argv, out, client = self.args
        try:
            self.code = run_in_container(spec, argv, out=out, client=client)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


# --- the spec, the CLI glue -----------------------------------------------------------------------

def test_spec_json_round_trip_and_validation(tmp_path):
    spec = ContainerSpec(image="img:1", rule="sft", project="p-1", devices=["/dev/davinci0"],
                         mounts=[{"source": "/a", "target": "/b"}], env={"N": 8}, shm_size="128g",
                         network="host", workdir="/w", user="1000:1000")
    assert spec.mounts == [{"source": "/a", "target": "/b", "read_only": False}]
    assert spec.env == {"N": "8"}
    again = ContainerSpec.from_json(spec.to_json())
    assert again == spec
    (tmp_path / "spec.json").write_text(spec.to_json())
    assert load_spec(f"@{tmp_path / 'spec.json'}") == spec
    with pytest.raises(PipelineError, match="unknown key"):
        ContainerSpec.from_json('{"image": "i", "rule": "r", "project": "p", "shm": "1g"}')
    with pytest.raises(PipelineError, match="missing project"):
        ContainerSpec.from_json('{"image": "i", "rule": "r"}')
    with pytest.raises(PipelineError, match="not valid JSON"):
        ContainerSpec.from_json("{image")
    with pytest.raises(PipelineError, match="shm_size"):
        ContainerSpec(image="i", rule="r", project="p", shm_size="lots")
    with pytest.raises(PipelineError, match="absolute path"):
        ContainerSpec(image="i", rule="r", project="p", mounts=[{"source": "rel", "target": "/t"}])
    with pytest.raises(PipelineError, match="cannot read container spec"):
        load_spec(f"@{tmp_path / 'missing.json'}")


def test_project_id_is_stable_and_label_safe(tmp_path):
    (tmp_path / "my proj").mkdir()
    pid = project_id(str(tmp_path / "my proj"))
    assert pid == project_id(str(tmp_path / "my proj" / ".."/ "my proj"))
    assert pid.startswith("my-proj-") and ContainerSpec(image="i", rule="r", project=pid).project == pid


def test_cli_parser_takes_the_command_after_double_dash():
    parser = argparse.ArgumentParser(prog="llamapipe")
    sub = parser.add_subparsers(dest="stage")
    add_container_run_parser(sub)
    args = parser.parse_args(["container-run", "--spec", "{}", "--", "python", "-m", "x", "--flag", "v"])
    assert args.handler is container_run_main
    assert [a for a in args.argv if a != "--"] == ["python", "-m", "x", "--flag", "v"]
    args.argv = ["--"]
    with pytest.raises(PipelineError, match="no command"):
        container_run_main(args)


def test_unreachable_engine_names_docker_host(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(PipelineError, match=r"cannot reach the Docker engine at DOCKER_HOST=unix://.*nothing\.sock"):
        connect()


# --- NPU devices without Ascend hardware ------------------------------------------------------------

def _fake_dev(root: Path, cards=range(8)) -> Path:
    dev = root / "dev"
    dev.mkdir(parents=True)
    for c in cards:
        (dev / f"davinci{c}").touch()
    for name in NPU_CONTROL_DEVICES:
        (dev / name).touch()
    return dev


def _fake_driver_root(root: Path) -> Path:
    (root / "usr/local/Ascend/driver/lib64").mkdir(parents=True)
    (root / "usr/local/Ascend/driver/version.info").write_text("Version=24.1.rc2\n")
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/npu-smi").write_text("#!/bin/sh\necho fake npu-smi\n")
    (root / "usr/local/dcmi").mkdir(parents=True)
    return root


def test_create_kwargs_fake_devices_no_ascend_hardware(tmp_path):
    dev = _fake_dev(tmp_path)
    root = _fake_driver_root(tmp_path / "host")
    devices = device_nodes([0, 3], dev_root=str(dev))
    assert devices == [f"{dev}/davinci0", f"{dev}/davinci3", f"{dev}/davinci_manager", f"{dev}/devmm_svm",
                       f"{dev}/hisi_hdc"]
    mounts = driver_mounts(root=str(root))
    assert [(m["target"], m["read_only"]) for m in mounts] == [
        ("/usr/local/Ascend/driver", True), ("/usr/local/bin/npu-smi", True), ("/usr/local/dcmi", True)]
    spec = ContainerSpec(image="paddle-npu:pinned", rule="sft", project="proj-1", devices=devices,
                         mounts=[*mounts, {"source": str(tmp_path), "target": "/project", "read_only": False}],
                         env={"ASCEND_RT_VISIBLE_DEVICES": "0,3", "FLAGS_NPU_MC2": "1"}, shm_size="128g",
                         network="host", workdir="/project", user="1000:1000")
    kw = container_create_kwargs(spec, ["python", "-m", "llamapipe", "sft"])
    assert kw["image"] == "paddle-npu:pinned"
    assert kw["command"] == ["python", "-m", "llamapipe", "sft"]
    assert kw["devices"] == [f"{d}:{d}:rwm" for d in devices]
    assert kw["environment"] == {"ASCEND_RT_VISIBLE_DEVICES": "0,3", "FLAGS_NPU_MC2": "1"}
    assert [dict(m) for m in kw["mounts"]] == [
        {"Target": "/usr/local/Ascend/driver", "Source": f"{root}/usr/local/Ascend/driver", "Type": "bind",
         "ReadOnly": True},
        {"Target": "/usr/local/bin/npu-smi", "Source": f"{root}/usr/local/bin/npu-smi", "Type": "bind",
         "ReadOnly": True},
        {"Target": "/usr/local/dcmi", "Source": f"{root}/usr/local/dcmi", "Type": "bind", "ReadOnly": True},
        {"Target": "/project", "Source": str(tmp_path), "Type": "bind", "ReadOnly": False},
    ]
    assert kw["privileged"] is False and kw["network_mode"] == "host" and kw["shm_size"] == "128g"
    assert kw["working_dir"] == "/project" and kw["user"] == "1000:1000"
    assert kw["labels"][LABEL_PROJECT] == "proj-1" and kw["labels"][LABEL_RULE] == "sft"
    assert LABEL_STARTED in kw["labels"]
    # privileged only when asked; unset options are left to the engine
    kw2 = container_create_kwargs(ContainerSpec(image="i", rule="r", project="p", privileged=True), ["true"])
    assert kw2["privileged"] is True and kw2["network_mode"] == "none"
    assert not {"shm_size", "working_dir", "user"} & set(kw2)


def test_plain_files_refused_by_engine_fake_devices_no_ascend_hardware(docker_engine, base_image, tmp_path):
    """Docker needs real device nodes: a plain file fails at create/start with "not a device
    node"; the runner reports that as a PipelineError and leaves no container behind."""
    dev = _fake_dev(tmp_path)
    spec = _spec(base_image, devices=device_nodes([0], dev_root=str(dev)))
    with pytest.raises(PipelineError, match="not a device node"):
        run_in_container(spec, ["true"], out=io.BytesIO(), client=docker_engine.client)
    assert _ours(docker_engine.client, spec) == []


def test_device_nodes_mapped_fake_devices_no_ascend_hardware(docker_engine, base_image, tmp_path):
    """Character nodes standing in for the Ascend ones (numbers of /dev/null) reach the container
    at the same path, usable (rwm); the fake driver tree is mounted read-only."""
    dev = tmp_path / "dev"
    dev.mkdir()
    try:
        for name in ["davinci0", "davinci1", *NPU_CONTROL_DEVICES]:
            os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, 3))
    except PermissionError as exc:
        unavailable(f"cannot create device nodes here: {exc}")
    root = _fake_driver_root(tmp_path / "host")
    devices = device_nodes([0, 1], dev_root=str(dev))
    spec = _spec(base_image, devices=devices, mounts=driver_mounts(root=str(root)),
                 env={"ASCEND_RT_VISIBLE_DEVICES": "0,1"})
    script = (
        "import json, os, stat\n"
        "devs = json.loads(os.environ['DEVS'])\n"
        "res = {d: [stat.S_ISCHR(os.stat(d).st_mode), os.major(os.stat(d).st_rdev)] for d in devs}\n"
        "for d in devs:\n"
        "    open(d, 'w').write('x')\n"
        "try:\n"
        "    open('/usr/local/Ascend/driver/new', 'w')\n"
        "    res['driver_writable'] = True\n"
        "except OSError as e:\n"
        "    res['driver_writable'] = e.strerror\n"
        "res['version'] = open('/usr/local/Ascend/driver/version.info').read().strip()\n"
        "res['visible'] = os.environ['ASCEND_RT_VISIBLE_DEVICES']\n"
        "print(json.dumps(res))\n"
    )
    spec.env["DEVS"] = json.dumps(devices)
    out = io.BytesIO()
    assert run_in_container(spec, ["python3", "-c", script], out=out, client=docker_engine.client) == 0, out.getvalue()
    res = json.loads(out.getvalue().decode().strip().splitlines()[-1])
    assert all(res[d] == [True, 1] for d in devices)
    assert res["driver_writable"] == "Read-only file system"
    assert res["version"] == "Version=24.1.rc2" and res["visible"] == "0,1"


# --- the runner on a real engine ----------------------------------------------------------------------

def test_env_mounts_workdir_user_shm_network(docker_engine, base_image, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    rw.chmod(0o777)
    (ro / "input.txt").write_text("from the host\n")
    spec = _spec(base_image, env={"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3", "MSG": "a b  c"},
                 mounts=[{"source": str(ro), "target": "/in", "read_only": True},
                         {"source": str(rw), "target": "/out", "read_only": False}],
                 workdir="/out", user="1234:2345", shm_size="256m")
    script = (
        "import json, os\n"
        "res = {'cwd': os.getcwd(), 'visible': os.environ['ASCEND_RT_VISIBLE_DEVICES'], 'msg': os.environ['MSG'],\n"
        "       'uid': os.getuid(), 'gid': os.getgid(), 'input': open('/in/input.txt').read(),\n"
        "       'net': sorted(os.listdir('/sys/class/net'))}\n"
        "st = os.statvfs('/dev/shm'); res['shm'] = st.f_blocks * st.f_frsize\n"
        "try:\n"
        "    open('/in/new.txt', 'w').write('x')\n"
        "    res['ro_write'] = 'succeeded'\n"
        "except OSError as e:\n"
        "    res['ro_write'] = e.strerror\n"
        "open('result.txt', 'w').write('written inside\\n')\n"
        "print(json.dumps(res))\n"
    )
    out = io.BytesIO()
    code = run_in_container(spec, ["python3", "-c", script], out=out, client=docker_engine.client)
    assert code == 0, out.getvalue()
    res = json.loads(out.getvalue())
    assert res["cwd"] == "/out" and res["visible"] == "0,1,2,3" and res["msg"] == "a b  c"
    assert (res["uid"], res["gid"]) == (1234, 2345)
    assert res["input"] == "from the host\n"
    assert res["ro_write"] == "Read-only file system" and not (ro / "new.txt").exists()
    assert res["net"] == ["lo"]  # network "none"
    assert res["shm"] == 256 * 1024 * 1024
    written = rw / "result.txt"
    assert written.read_text() == "written inside\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (1234, 2345)
    assert _ours(docker_engine.client, spec) == []  # removed


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_the_containers(docker_engine, base_image, code):
    spec = _spec(base_image)
    out = io.BytesIO()
    assert run_in_container(spec, ["sh", "-c", f"echo out; echo err >&2; exit {code}"], out=out,
                            client=docker_engine.client) == code
    assert sorted(out.getvalue().split()) == [b"err", b"out"]  # stdout and stderr, combined
    assert _ours(docker_engine.client, spec) == []


def test_log_streams_while_the_container_runs(docker_engine, base_image, tmp_path):
    spec = _spec(base_image)
    log_path = tmp_path / "rule.log"
    with open(log_path, "wb") as out:
        runner = _Runner(spec, ["sh", "-c", "echo first line; sleep 3; echo second line"], out, docker_engine.client)
        runner.start()
        _wait_for(lambda: b"first line" in log_path.read_bytes(), what="the first line in the log")
        assert b"second line" not in log_path.read_bytes()
        running = _ours(docker_engine.client, spec)
        assert [c.status for c in running] == ["running"]
        runner.join(30)
    assert runner.error is None and runner.code == 0
    assert log_path.read_bytes() == b"first line\nsecond line\n"
    assert _ours(docker_engine.client, spec) == []


def test_silence_longer_than_the_client_timeout(docker_engine, base_image, monkeypatch):
    """A quiet stage must not hit the client's socket timeout in the log stream or in wait():
    once the container has started, the client's timeout drops to 2 s, the stage is silent 4 s."""
    import docker

    client = docker.DockerClient(base_url=docker_engine.host, timeout=120)
    start = client.api.start

    def start_then_short_timeout(*args, **kwargs):
        result = start(*args, **kwargs)
        client.api.timeout = 2
        return result

    monkeypatch.setattr(client.api, "start", start_then_short_timeout)
    try:
        out = io.BytesIO()
        code = run_in_container(_spec(base_image), ["sh", "-c", "sleep 4; echo done"], out=out, client=client)
    finally:
        client.close()
    assert client.api.timeout == 2
    assert (code, out.getvalue()) == (0, b"done\n")


def test_killed_container_gives_137_and_is_removed(docker_engine, base_image, tmp_path):
    spec = _spec(base_image)
    log_path = tmp_path / "rule.log"
    with open(log_path, "wb") as out:
        runner = _Runner(spec, ["sh", "-c", "echo ready; sleep 60"], out, docker_engine.client)
        runner.start()
        _wait_for(lambda: b"ready" in log_path.read_bytes(), what="the container to start")
        (container,) = _ours(docker_engine.client, spec)
        container.kill()  # what `docker kill` does
        runner.join(30)
    assert runner.error is None and runner.code == 137
    assert _ours(docker_engine.client, spec) == []


@pytest.mark.parametrize("signum, command, extra", [
    (signal.SIGTERM, "trap 'echo got TERM; exit 0' TERM; echo ready; sleep 60 & wait", []),
    # PID 1 ignoring SIGTERM: the runner's stop falls back to SIGKILL after --stop-timeout
    (signal.SIGINT, "echo ready; exec sleep 60", ["--stop-timeout", "1"]),
], ids=["SIGTERM", "SIGINT-container-ignores-TERM"])
def test_signal_to_runner_stops_and_removes_container(docker_engine, base_image, tmp_path, signum, command, extra):
    spec = _spec(base_image)
    log_path = tmp_path / "rule.log"
    env = docker_engine.env(PYTHONPATH=str(ROOT / "src"))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llamapipe.runners.container", "--spec", spec.to_json(),
                                 *extra, "--", "sh", "-c", command], stdout=out, stderr=subprocess.PIPE, env=env)
        try:
            _wait_for(lambda: b"ready" in log_path.read_bytes() or proc.poll() is not None,
                      what="the container to start")
            assert proc.poll() is None, proc.stderr.read().decode()
            started = time.monotonic()
            proc.send_signal(signum)
            code = proc.wait(timeout=30)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = proc.stderr.read().decode()
    assert code == 128 + signum, stderr
    assert f"received {signal.Signals(signum).name}" in stderr
    assert took < 15, f"stopping took {took:.1f} s"
    assert _ours(docker_engine.client, spec) == []
    if signum == signal.SIGTERM:
        assert b"got TERM" in log_path.read_bytes()  # the stage saw the stop and could clean up


def test_stale_containers_of_the_same_rule_are_removed(docker_engine, base_image):
    client = docker_engine.client
    spec = _spec(base_image, rule="sft")
    labels = {LABEL_PROJECT: spec.project, LABEL_RULE: spec.rule, LABEL_STARTED: "2020-01-01T00:00:00+00:00"}
    created = client.containers.create(base_image, ["true"], labels=labels, network_mode="none")
    exited = client.containers.run(base_image, ["true"], labels=labels, network_mode="none", detach=True)
    exited.wait()
    other_rule = client.containers.create(base_image, ["true"], network_mode="none",
                                          labels={**labels, LABEL_RULE: "merge"})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llamapipe.runners.container")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert run_in_container(spec, ["true"], out=io.BytesIO(), client=client) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert _ours(client, spec) == []
    removed = [r.getMessage() for r in records if "stale container" in r.getMessage()]
    assert len(removed) == 2 and any(created.short_id in m for m in removed)
    assert any(exited.short_id in m for m in removed)
    other_rule.reload()  # another rule's container is left alone
    other_rule.remove(force=True)


def test_missing_image_is_an_error_and_nothing_is_pulled(docker_engine, monkeypatch):
    client = docker_engine.client

    def no_pull(*a, **k):
        raise AssertionError("the runner must never pull")

    monkeypatch.setattr(client.api, "pull", no_pull)
    monkeypatch.setattr(client.images, "pull", no_pull)
    spec = _spec("llamapipe-no-such-image:1")
    with pytest.raises(PipelineError, match=r"image llamapipe-no-such-image:1 not found locally \(build it with the "
                                            r"build_image rule / load it\)"):
        run_in_container(spec, ["true"], out=io.BytesIO(), client=client)
    assert _ours(client, spec) == []


def test_engine_socket_mounts_are_refused(docker_engine, base_image, tmp_path):
    sock = docker_engine.host[len("unix://"):]
    for source in (sock, os.path.dirname(sock), "/var/run/docker.sock", "/"):
        spec = _spec(base_image, mounts=[{"source": source, "target": "/mnt", "read_only": True}])
        with pytest.raises(PipelineError, match="refusing to mount .* socket"):
            run_in_container(spec, ["true"], out=io.BytesIO(), client=docker_engine.client)
        assert _ours(docker_engine.client, spec) == []
    # a plain project directory is fine
    refuse_engine_socket_mounts(_spec(base_image, mounts=[{"source": str(tmp_path), "target": "/p"}]),
                                docker_engine.client)


def test_cpu_image_runs_paddle_and_the_mounted_project(docker_engine, cpu_image, tmp_path):
    """The CPU stage image carries the pinned stack; the project's code comes from the bind mount."""
    spec = _spec(cpu_image, mounts=[{"source": str(ROOT / "src"), "target": "/project/src", "read_only": True},
                                    {"source": str(tmp_path), "target": "/work", "read_only": False}],
                 env={"PYTHONPATH": "/project/src", "OMP_NUM_THREADS": "1"}, workdir="/work",
                 user=f"{os.getuid()}:{os.getgid()}")
    out = io.BytesIO()
    code = run_in_container(spec, ["python", "-c", "import paddle, llamapipe.core.errors; print(paddle.__version__)"],
                            out=out, client=docker_engine.client)
    assert code == 0, out.getvalue().decode(errors="replace")
    assert out.getvalue().decode().strip().splitlines()[-1] == "3.0.0"


def test_sigkilled_runner_leaves_a_container_the_rerun_removes(docker_engine, base_image, tmp_path):
    """A runner killed with SIGKILL cannot stop its container; the next run of that rule must."""
    client = docker_engine.client
    spec = _spec(base_image, rule="sft")
    log_path = tmp_path / "rule.log"
    env = docker_engine.env(PYTHONPATH=str(ROOT / "src"))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llamapipe.runners.container", "--spec", spec.to_json(),
                                 "--", "sh", "-c", "echo ready; exec sleep 300"], stdout=out, stderr=subprocess.PIPE,
                                env=env)
        _wait_for(lambda: b"ready" in log_path.read_bytes() or proc.poll() is not None, what="the container")
        proc.kill()
        proc.wait(timeout=30)
    (orphan,) = _ours(client, spec)
    orphan.reload()
    assert orphan.status == "running"  # nobody stopped it
    assert run_in_container(spec, ["true"], out=io.BytesIO(), client=client) == 0
    assert _ours(client, spec) == []
