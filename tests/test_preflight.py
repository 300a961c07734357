"""preflight on npu, on a fake host (no Ascend hardware here): a temp dir stands in for /dev
and /usr/local/Ascend, a script stands in for lspci."""

from __future__ import annotations

import json
import os
import stat

import pytest

from llamapipe.errors import PipelineError
from llamapipe.stages import preflight

LSPCI_910 = "\n".join(f"{bus}:00.0 Processing accelerators: Huawei Technologies Co., Ltd. Device d802 (rev 20)"
                      for bus in ("28", "29", "38", "39", "48", "49", "59", "5a"))


def fake_host(tmp_path, cards=range(8), driver="23.0.3", cann="8.0.RC1", lspci=LSPCI_910):
    dev, ascend, bindir = tmp_path / "fake-dev", tmp_path / "fake-ascend", tmp_path / "bin"
    for d in (dev, ascend / "driver", ascend / "ascend-toolkit/latest/x86_64-linux", bindir):
        d.mkdir(parents=True)
    for c in cards:
        (dev / f"davinci{c}").touch()
    for node in ("davinci_manager", "devmm_svm", "hisi_hdc"):
        (dev / node).touch()
    if driver:
        (ascend / "driver/version.info").write_text(f"Version={driver}\nascendhal_version=7.35.19\n")
    if cann:
        (ascend / "ascend-toolkit/latest/x86_64-linux/ascend_toolkit_install.info").write_text(
            f"package_name=Ascend-cann-toolkit\nversion={cann}\narch=x86_64\n")
    script = bindir / "lspci"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lspci}\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"target": "npu", "devices": "0,1,2,3,4,5,6,7", "min_free_disk_gb": 0,
            "dev_root": str(dev), "ascend_root": str(ascend), "lspci": str(script)}


@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")


def test_reads_cards_driver_and_cann_fake_devices_no_ascend_hardware(tmp_path, no_engine):
    params = fake_host(tmp_path)
    with pytest.raises(PipelineError) as err:
        preflight.run(params, str(tmp_path / "out.json"))
    message = str(err.value)
    # the only thing missing on this fake host is the container engine
    assert message.count("\n  - ") == 1 and "container engine not reachable" in message
    assert "no-engine.sock" in message
    assert not (tmp_path / "out.json").exists()


def test_everything_missing_is_listed_at_once_fake_devices_no_ascend_hardware(tmp_path, no_engine):
    params = fake_host(tmp_path, cards=range(6), driver=None, cann=None, lspci="00:1f.0 ISA bridge: Intel")
    os.remove(os.path.join(params["dev_root"], "devmm_svm"))
    with pytest.raises(PipelineError) as err:
        preflight.run(params, str(tmp_path / "out.json"))
    message = str(err.value)
    for expected in ["no Ascend 910 card on the PCI bus", "cards [6, 7] requested", "devmm_svm missing",
                     "no driver version", "no CANN toolkit", "container engine not reachable"]:
        assert expected in message, expected


def test_versions_are_read_fake_devices_no_ascend_hardware(tmp_path):
    params = fake_host(tmp_path, driver="23.0.3", cann="8.0.RC1")
    assert preflight.driver_version(params["ascend_root"]) == "23.0.3"
    assert preflight.cann_version(params["ascend_root"]) == "8.0.RC1"
    assert preflight.count_pci_npus(params["lspci"]) == 8
    assert preflight.davinci_cards(params["dev_root"]) == list(range(8))
    assert preflight.count_pci_npus(str(tmp_path / "no-lspci")) is None


def test_cpu_preflight_records_the_stack(tmp_path):
    report = preflight.run({"target": "cpu", "min_free_disk_gb": 0}, str(tmp_path / "p.json"))
    assert report["versions"]["paddle"] == "3.0.0" and report["versions"]["paddlenlp"] == "3.0.0b4"
    assert json.loads((tmp_path / "p.json").read_text())["problems"] == []


def test_disk_space_is_checked(tmp_path):
    with pytest.raises(PipelineError, match="GiB free"):
        preflight.run({"target": "cpu", "min_free_disk_gb": 10**9}, str(tmp_path / "p.json"))
