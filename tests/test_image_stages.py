"""pull_image / build_image against the tests' real Docker engine (no registry is reachable)."""

from __future__ import annotations

import json

import pytest

from llamapipe.core.errors import PipelineError
from llamapipe.stages import image


@pytest.mark.container
def test_build_records_the_image_and_passes_the_build_args(docker_engine, base_image, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    (tmp_path / "Dockerfile.test").write_text("ARG BASE\nFROM ${BASE}\nARG GREETING=unset\n"
                                              "RUN echo \"$GREETING\" > /greeting\n")
    monkeypatch.chdir(tmp_path)
    record = image.build("Dockerfile.test", "llamapipe-imagetest:1", {"BASE": base_image, "GREETING": "hello"},
                         str(tmp_path / "npu.json"))
    assert json.loads((tmp_path / "npu.json").read_text()) == record
    assert record["tag"] == "llamapipe-imagetest:1" and record["build_args"]["GREETING"] == "hello"
    built = docker_engine.client.images.get("llamapipe-imagetest:1")
    assert record["id"] == built.id and built.labels.get("llamapipe.image") == "npu"
    out = docker_engine.client.containers.run("llamapipe-imagetest:1", ["cat", "/greeting"], remove=True,
                                              network_mode="none")
    assert out == b"hello\n"
    docker_engine.client.images.remove("llamapipe-imagetest:1", force=True)


@pytest.mark.container
def test_failed_build_names_the_step_and_records_nothing(docker_engine, base_image, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    (tmp_path / "Dockerfile.bad").write_text(f"FROM {base_image}\nRUN echo about to fail && exit 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="build of llamapipe-imagetest:bad failed: .*returned a non-zero code: 3"):
        image.build("Dockerfile.bad", "llamapipe-imagetest:bad", {}, str(tmp_path / "npu.json"))
    assert not (tmp_path / "npu.json").exists()


@pytest.mark.container
def test_unreachable_registry_is_a_clear_error_and_records_nothing(docker_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    with pytest.raises(PipelineError, match=r"pull of 127\.0\.0\.1:9/paddle-npu:x failed"):
        image.pull("127.0.0.1:9/paddle-npu:x", str(tmp_path / "base.json"))
    assert not (tmp_path / "base.json").exists()


@pytest.mark.parametrize("ref, split", [
    ("registry.baidubce.com/device/paddle-npu:cann80RC1-ubuntu20-x86_64-gcc84-py39",
     ("registry.baidubce.com/device/paddle-npu", "cann80RC1-ubuntu20-x86_64-gcc84-py39")),
    ("localhost:5000/paddle-npu", ("localhost:5000/paddle-npu", "latest")),
    ("ubuntu", ("ubuntu", "latest")),
])
def test_split_reference_keeps_a_registry_port(ref, split):
    assert image.split_reference(ref) == split
