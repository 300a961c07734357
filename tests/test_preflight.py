"""preflight on npu, on a fake host (no Ascend hardware here): tests/fake_ascend.py's temp tree
stands in for /dev, /usr/local/Ascend and /proc, scripts stand in for lspci and npu-smi.
(Each check alone: tests/test_ascend_checks.py.)"""

from __future__ import annotations

import json
import os

import pytest

from fake_ascend import PAIRING, build
from llamapipe.config.paths import PATHS
from llamapipe.core.errors import PipelineError
from llamapipe.stages import preflight


def fake_host(tmp_path, cards=8, driver="24.1.0", cann="8.0.0", pci="d802"):
    fake = build(tmp_path / "fake-host", cards=cards, driver=driver, cann=cann, pci=pci)
    return {"target": "npu", "devices": "0,1,2,3,4,5,6,7", "min_free_disk_gb": 0, "host_root": str(fake.root),
            "dev_root": "/dev", "ascend_root": "/usr/local/Ascend", "lspci": str(fake.bin / "lspci"),
            "pairing": PAIRING, "shm_size": "128g", "sft_dtype": "bfloat16",
            "model_name_or_path": PATHS["base_model"], "model_built": True}  # no hub needed here


@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")


def test_reads_cards_driver_and_cann_fake_devices_no_ascend_hardware(tmp_path, no_engine):
    params = fake_host(tmp_path)
    with pytest.raises(PipelineError) as err:
        preflight.run(params, str(tmp_path / "out.json"))
    message = str(err.value)
    # the only thing missing on this fake host is the container engine
    assert message.count("\n  - ") == 1 and "cannot reach the Docker engine" in message
    assert "no-engine.sock" in message
    assert not (tmp_path / "out.json").exists()


def test_everything_missing_is_listed_at_once_fake_devices_no_ascend_hardware(tmp_path, no_engine):
    params = fake_host(tmp_path, cards=6, driver=None, pci="")
    os.remove(os.path.join(params["host_root"], "dev", "devmm_svm"))
    with pytest.raises(PipelineError) as err:
        preflight.run(params, str(tmp_path / "out.json"))
    message = str(err.value)
    # the host needs no CANN toolkit: the stages use the image's (rule preflight_image checks it)
    for expected in ["no Ascend 910 card on the PCI bus", "cards [6, 7] requested", "devmm_svm missing",
                     "no driver version", "cards [6, 7] asked for (devices) are not listed by npu-smi",
                     "cannot reach the Docker engine"]:
        assert expected in message, expected


def test_versions_are_read_fake_devices_no_ascend_hardware(tmp_path, monkeypatch):
    """The host's versions and cards, read by the Ascend checks, land in preflight.json (the
    engine check is stood in for: the fake host has no Docker engine)."""
    params = fake_host(tmp_path, driver="23.0.3", cann="8.0.RC1")
    params["pairing"] = {**PAIRING, "cann": "8.0.RC1", "drivers": ["23.0.3"], "driver_min": "23.0.3"}
    monkeypatch.setattr(preflight, "engine_version", lambda: ("20.10.24", None))
    report = preflight.run(params, str(tmp_path / "out.json"))
    assert report["driver_version"] == "23.0.3" and report["cann_version"] == "8.0.RC1"
    assert report["pci_ascend_910"] == 8 and report["davinci_cards"] == list(range(8))
    assert json.loads((tmp_path / "out.json").read_text())["engine_version"] == "20.10.24"


def test_cpu_preflight_records_the_stack(tmp_path):
    report = preflight.run({"target": "cpu", "min_free_disk_gb": 0}, str(tmp_path / "p.json"))
    assert report["versions"]["paddle"] == "3.0.0" and report["versions"]["paddlenlp"] == "3.0.0b4"
    assert json.loads((tmp_path / "p.json").read_text())["problems"] == []


def test_disk_space_is_checked(tmp_path):
    with pytest.raises(PipelineError, match="GiB free"):
        preflight.run({"target": "cpu", "min_free_disk_gb": 10**9}, str(tmp_path / "p.json"))
