"""A failed job's reason reaches the terminal (profiles/default: show-failed-logs), on both targets."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import yaml

from conftest import ROOT, copy_project, snakemake

pytestmark = pytest.mark.e2e


def test_default_profile_shows_failed_logs():
    profile = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    assert profile["show-failed-logs"] is True


def _archive_with_a_bad_line(path):
    good = json.dumps({"src": "类型#裙", "tgt": "一条裙子"}, ensure_ascii=False)
    files = {"train.json": f"{good}\n{{not json\n{good}\n", "dev.json": f"{good}\n"}
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"AdvertiseGen/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cpu_job_failure_prints_the_reason_on_the_terminal(tmp_path):
    project = copy_project(tmp_path / "cpu")
    sha = _archive_with_a_bad_line(project / "bad.tar.gz")
    (project / "overlay.yaml").write_text(f"data:\n  url: 'file:bad.tar.gz'\n  sha256: '{sha}'\n")
    proc = snakemake(project, "results/data/train.json", "--cores", "1", "--configfile", "overlay.yaml",
                     check=False)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Logfile results/logs/prepare_data.log" in terminal
    assert "line 2: not valid JSON" in terminal  # the stage's own message, not only "check log file(s)"


def test_npu_job_failure_prints_the_reason_on_the_terminal(tmp_path):
    """No Ascend card here: the npu preflight fails, and says why on the terminal."""
    project = copy_project(tmp_path / "npu")
    proc = snakemake(project, "results/preflight.json", "--cores", "1", "--config", "target=npu", check=False)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Logfile results/logs/preflight.log" in terminal
    assert "no Ascend 910 card on the PCI bus" in terminal
