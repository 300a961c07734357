"""The data a real NPU run trains on (issue 21, item 5).

- target npu overlays ``npu.data``: the guide's AdvertiseGen archive, ``sha256: null`` (published
  nowhere): the first download is trusted, prints its hash and the line that pins it, and records
  it (``download.json``, provenance); a later run with the pin verifies it;
- a ``file:`` url must be pinned (no download to trust: the message gives its sha256);
- the bundled 480-record sample is refused on target npu unless ``data.allow_sample: true``; the
  rehearsal (npu DAG at cpu sizes) keeps it, as a listed difference.

Downloads are served by a real HTTP server on 127.0.0.1 (this machine cannot reach bcebos.com).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, snakemake
from http_fixtures import ServerScript, serve
from llamapipe.config import deep_merge, load
from llamapipe.config import rules as config_rules
from llamapipe.config.rehearsal import describe
from llamapipe.config.stage_params import stage_params
from llamapipe.core.errors import PipelineError
from llamapipe.stages import download, provenance
from npu_commands import find_step, flags, parse, shell_commands
from test_download import GOOD_FILES, good_members, make_tar

RAW = yaml.safe_load((ROOT / "config.yaml").read_text())
GUIDE_URL = "https://bj.bcebos.com/paddlenlp/datasets/examples/AdvertiseGen.tar.gz"
SAMPLE_URL = "file:assets/AdvertiseGen-sample.tar.gz"
SAMPLE_SHA256 = hashlib.sha256((ROOT / "assets" / "AdvertiseGen-sample.tar.gz").read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _in_project_and_no_backoff(monkeypatch):
    monkeypatch.chdir(ROOT)  # config.yaml's sample url is relative to the project
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)


def resolved(tmp_path: Path, **over) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(RAW, over), allow_unicode=True))
    return load(str(path))


def refused(tmp_path: Path, **over) -> str:
    with pytest.raises(PipelineError) as e:
        resolved(tmp_path, **over)
    return str(e.value)


# --- the config: what each target trains on --------------------------------------------------------


def test_npu_trains_on_the_guides_archive_by_default_and_cpu_on_the_pinned_sample(tmp_path):
    npu = resolved(tmp_path, target="npu")
    assert npu["data"]["url"] == GUIDE_URL and npu["data"]["sha256"] is None
    assert npu["data"]["md5"] is None  # PaddleNLP publishes md5s of other files (config.yaml says which)
    cpu = resolved(tmp_path)
    assert cpu["data"]["url"] == SAMPLE_URL and cpu["data"]["sha256"] == SAMPLE_SHA256


def test_npu_refuses_the_bundled_sample_unless_asked_for(tmp_path):
    sample = {"url": SAMPLE_URL, "sha256": SAMPLE_SHA256}
    msg = refused(tmp_path, target="npu", npu={"data": sample})
    assert f"npu.data.url ({SAMPLE_URL}) is the bundled sample: 480 synthetic records" in msg
    assert GUIDE_URL in msg and "--config 'data={allow_sample: true}'" in msg
    # the same bytes under another name are the sample too
    copy = tmp_path / "mine.tar.gz"
    copy.write_bytes((ROOT / "assets" / "AdvertiseGen-sample.tar.gz").read_bytes())
    assert "is the bundled sample" in refused(tmp_path, target="npu", npu={"data": {**sample, "url": copy.as_uri()}})
    cfg = resolved(tmp_path, target="npu", npu={"data": sample}, data={"allow_sample": True})
    assert cfg["data"]["url"] == SAMPLE_URL and config_rules.check(cfg) == []


def test_the_rehearsal_keeps_the_sample_as_a_listed_difference(tmp_path):
    cfg = resolved(tmp_path, target="npu", rehearsal="cpu")
    assert cfg["data"]["url"] == SAMPLE_URL and cfg["data"]["sha256"] == SAMPLE_SHA256
    assert {"key": "npu.data", "value": {}} in [{k: d[k] for k in ("key", "value")} for d in describe(cfg)]


def test_null_sha256_is_trust_on_first_use_for_http_and_refused_for_a_local_file(tmp_path):
    url = "https://example.org/datasets/AdvertiseGen.tar.gz"
    assert resolved(tmp_path, data={"url": url, "sha256": None})["data"]["sha256"] is None
    msg = refused(tmp_path, data={"sha256": None})
    assert f"data.sha256 is null, but data.url ({SAMPLE_URL}) is a local file" in msg
    assert f"its sha256 is {SAMPLE_SHA256}" in msg


def test_download_params_say_where_the_pin_goes_and_leave_the_cpu_command_alone(tmp_path):
    npu = stage_params("download_data", resolved(tmp_path, target="npu"))
    assert npu["url"] == GUIDE_URL and npu["sha256"] is None and npu["sha256_key"] == "npu.data.sha256"
    assert set(stage_params("download_data", resolved(tmp_path))) == {  # no rerun of existing cpu results
        "url", "sha256", "retries", "connect_timeout", "read_timeout"}
    sums = {"train.json": "0" * 32}
    assert stage_params("download_data", resolved(tmp_path, data={"md5": sums}))["md5"] == sums


# --- provenance: what the download verified ---------------------------------------------------------


def test_provenance_records_the_hash_trusted_on_first_use_and_the_pin(tmp_path):
    body = make_tar(good_members())
    actual = hashlib.sha256(body).hexdigest()
    out = tmp_path / "data" / "AdvertiseGen"
    with serve(ServerScript(body=body)) as base:
        download.run(f"{base}/AdvertiseGen.tar.gz", None, str(out), str(tmp_path / "cache"),
                     sha256_key="npu.data.sha256")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifest = {"stage": "download-data", "started": "t0", "finished": "t1", "environment": {}, "inputs": {},
                "outputs": {"data/AdvertiseGen": "tree:..."}}
    (manifests / "download-data.json").write_text(json.dumps(manifest))
    config = {"target": "npu", "data": {"url": f"{base}/AdvertiseGen.tar.gz", "sha256": None}}
    record = provenance.collect(str(manifests), config, str(tmp_path), [], str(tmp_path / "provenance.json"))
    archive = record["data_archive"]
    assert archive["sha256"] == actual and archive["pinned"] is False and archive["verified_by"] == "download-data"
    assert archive["pin"] == {"config.yaml": f'in the npu: -> data: section:  sha256: "{actual}"',
                              "--config": f"--config 'npu={{data: {{sha256: {actual}}}}}'"}
    assert archive["md5"] == {n: hashlib.md5(d).hexdigest() for n, d in GOOD_FILES.items()}
    assert json.loads((tmp_path / "provenance.json").read_text())["data_archive"] == archive


# --- through Snakemake -----------------------------------------------------------------------------


def _download_params(project: Path, *config: str) -> dict:
    """download_data's --params in the dry-run of ``--config *config``."""
    out = snakemake(project, "-n", "-p", "data/AdvertiseGen/train.json", "--config", *config).stdout
    command = parse(shell_commands(out)["download_data"])  # npu: in the container, a bash -c step
    step = find_step(command, "download-data") if command.steps else command.argv
    return json.loads(flags(step[step.index("download-data") + 1:])["--params"])


def test_dry_run_of_the_npu_target_fetches_the_guides_archive_and_takes_the_pin(tmp_path):
    project = copy_project(tmp_path / "project")
    params = _download_params(project, "target=npu")
    assert params["url"] == GUIDE_URL and params["sha256"] is None and params["sha256_key"] == "npu.data.sha256"
    pin = "ab" * 32
    assert _download_params(project, "target=npu", f"npu={{data: {{sha256: {pin}}}}}")["sha256"] == pin
    sample = f"npu={{data: {{url: '{SAMPLE_URL}', sha256: {SAMPLE_SHA256}}}}}"
    proc = snakemake(project, "-n", "data/AdvertiseGen/train.json", "--config", "target=npu", sample, check=False)
    assert proc.returncode != 0 and "data.allow_sample: true" in proc.stdout + proc.stderr
    assert _download_params(project, "target=npu", sample, "data={allow_sample: true}")["url"] == SAMPLE_URL


@pytest.mark.e2e
def test_first_download_prints_the_pin_and_the_pinned_rerun_verifies_it(tmp_path):
    """The user's first day, on the cpu target's stages with a real HTTP server standing in for
    bcebos.com: the terminal shows the hash and the line; that line, typed, verifies the archive."""
    project = copy_project(tmp_path / "project")
    body = make_tar(good_members())
    actual = hashlib.sha256(body).hexdigest()
    with serve(ServerScript(body=body)) as base:
        over = project / "over.yaml"
        over.write_text(yaml.safe_dump({"data": {"url": f"{base}/AdvertiseGen.tar.gz", "sha256": None}}))
        first = snakemake(project, "--cores", "1", "data/AdvertiseGen/train.json", "--configfile", str(over))
        terminal = first.stdout + first.stderr
        line = re.search(r"in the same --config as your other values: (--config '[^']*')", terminal)
        assert line and line.group(1) == f"--config 'data={{sha256: {actual}}}'", terminal
        pin = shlex.split(line.group(1))[1]
        second = snakemake(project, "--cores", "1", "data/AdvertiseGen/train.json", "--configfile", str(over),
                           "--config", pin)
    log = (project / "results" / "logs" / "download_data.log").read_text()
    assert "rule download_data" in second.stdout + second.stderr  # the pin changed its params: it reran
    assert "sha256 ok" in log and "trusted on first use" not in log, log
    assert json.loads((project / "data" / "AdvertiseGen" / download.RECORD).read_text())["pinned"] is True
