"""The whole CPU DAG with `runtime: container`: every stage in the llamapipe-cpu image on a real
Docker engine (started by the tests), same predictions as the local runtime."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import copy_project, snakemake

pytestmark = [pytest.mark.container, pytest.mark.e2e]

SMALL = "sft:\n  max_steps: 120\n  save_steps: 60\npredict:\n  limit: 12\n  max_new_tokens: 48\n"


def test_cpu_dag_in_containers_gives_the_local_predictions(tmp_path, docker_engine, cpu_image):  # noqa: F811
    local = copy_project(tmp_path / "local")
    boxed = copy_project(tmp_path / "boxed")
    for project in (local, boxed):
        (project / "small.yaml").write_text(SMALL)
    snakemake(local, "results/metrics.json", "--cores", "2", "--configfile", "small.yaml")
    env = docker_engine.env()
    snakemake(boxed, "results/metrics.json", "--cores", "2", "--configfile", "small.yaml",
              "--config", "runtime=container", env=env)

    log = (boxed / "results/logs/sft.log").read_text()
    assert "container-run" not in log  # the log is the container's own output, streamed
    assert "loss" in log
    manifest = json.loads((boxed / "results/manifests/sft.json").read_text())
    assert manifest["host"] != socket.gethostname()  # written inside the container
    assert manifest["environment"]["paddlepaddle"] == "3.0.0"  # the image's pinned stack
    assert (boxed / "results/predictions.json").read_bytes() == (local / "results/predictions.json").read_bytes()
    from llamapipe.runners.container import project_id

    assert not docker_engine.client.containers.list(
        all=True, filters={"label": f"llamapipe.project={project_id(str(boxed))}"})


def test_container_overhead_bench_quick(docker_engine, cpu_image, monkeypatch):  # noqa: F811
    import importlib.util

    from conftest import ROOT

    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    spec = importlib.util.spec_from_file_location("container_overhead", ROOT / "bench/container_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    assert set(result) == {"python -c pass", "evaluate stage"}
    assert all(r["container_s"]["runs"] == 1 for r in result.values())


def test_interrupted_snakemake_leaves_no_container(tmp_path, docker_engine, cpu_image):  # noqa: F811
    """Ctrl-C on a containerized run (SIGINT to the terminal's foreground process group, as the
    terminal sends it): each runner stops its container, Snakemake exits, nothing is left."""
    import os
    import signal
    import subprocess
    import time

    from conftest import SNAKEMAKE

    project = copy_project(tmp_path / "project")
    (project / "long.yaml").write_text("sft:\n  max_steps: 100000\n")
    proc = subprocess.Popen([*SNAKEMAKE, "results/sft", "--cores", "2", "--configfile", "long.yaml", "--config",
                             "runtime=container"], cwd=project, env=docker_engine.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    from llamapipe.runners.container import project_id

    ours = {"label": f"llamapipe.project={project_id(str(project))}"}
    deadline = time.time() + 900
    while not (project / "results/checkpoints/sft").exists():  # sft's container is training
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    assert docker_engine.client.containers.list(filters=ours)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    output = proc.stdout.read().decode()
    assert proc.returncode != 0, output[-3000:]
    # Snakemake may exit while a runner still stops and removes its container (up to its stop timeout)
    deadline = time.time() + 30
    while docker_engine.client.containers.list(all=True, filters=ours) and time.time() < deadline:
        time.sleep(0.5)
    assert docker_engine.client.containers.list(all=True, filters=ours) == [], output[-3000:]
