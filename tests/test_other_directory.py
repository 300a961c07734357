"""A project directory elsewhere: ``snakemake -d OTHER`` (``--directory``) with OTHER's own
config.yaml, results under OTHER, the workflow (Snakefile, assets/) in the checkout.

A relative ``file:`` path (config.yaml's bundled sample, ``file:assets/AdvertiseGen-sample.tar.gz``)
is the project directory's if the file is there, else the workflow's directory's
(``llamapipe.config.paths.file_url_path``): the config checks, the download stage (whose log and
record say which file it read and from where) and a container's read-only mounts resolve it the
same way. Snakemake runs here from the checkout with ``-d`` as a user types it: its state
(``.snakemake/``) and every output go to OTHER, the checkout is only read.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, snakemake
from llamapipe.config import load
from llamapipe.config.paths import (
    WORKFLOW_DIR_ENV,
    default_workflow_dir,
    file_url_path,
    locate_file_url,
    user_paths,
)
from llamapipe.core.errors import PipelineError
from llamapipe.stages import download

SAMPLE_URL = "file:assets/AdvertiseGen-sample.tar.gz"
SAMPLE = ROOT / "assets" / "AdvertiseGen-sample.tar.gz"


@pytest.fixture
def other(tmp_path, monkeypatch):
    """OTHER: a project directory holding a copy of config.yaml and nothing else, as cwd (what
    ``snakemake -d OTHER`` makes the working directory of the checks and of every job)."""
    project = tmp_path / "other"
    project.mkdir()
    shutil.copy2(ROOT / "config.yaml", project / "config.yaml")
    monkeypatch.chdir(project)
    monkeypatch.delenv(WORKFLOW_DIR_ENV, raising=False)
    return project


# --- the one parser of file: urls ------------------------------------------------------------------


def test_relative_path_is_the_projects_first(tmp_path):
    project, workflow = tmp_path / "project", tmp_path / "workflow"
    for d in (project, workflow):
        (d / "assets").mkdir(parents=True)
        (d / "assets" / "a.tar.gz").write_bytes(b"x")
    found = locate_file_url("file:assets/a.tar.gz", str(project), str(workflow))
    assert (found.path, found.base) == (str(project / "assets" / "a.tar.gz"), "project")
    assert found.where() == f"in the project directory {project}"


def test_relative_path_not_in_the_project_is_the_workflows(tmp_path):
    project, workflow = tmp_path / "project", tmp_path / "workflow"
    project.mkdir()
    (workflow / "assets").mkdir(parents=True)
    (workflow / "assets" / "a b.tar.gz").write_bytes(b"x")
    found = locate_file_url("file:assets/a%20b.tar.gz", str(project), str(workflow))
    assert (found.path, found.base) == (str(workflow / "assets" / "a b.tar.gz"), "workflow")
    assert found.where() == f"not in the project directory {project}; found in the workflow's directory {workflow}"
    assert file_url_path("file:assets/a%20b.tar.gz", str(project), str(workflow)) == found.path


def test_relative_path_in_neither_names_both(tmp_path):
    project, workflow = tmp_path / "project", tmp_path / "workflow"
    found = locate_file_url("file:assets/missing.tar.gz", str(project), str(workflow))
    assert (found.path, found.base, found.exists) == (str(project / "assets/missing.tar.gz"), "project", False)
    assert found.missing() == (f"no such file {project}/assets/missing.tar.gz, nor {workflow}/assets/missing.tar.gz "
                               "(a relative path is the project directory's or, if not there, the workflow's)")


def test_absolute_path_and_other_schemes(tmp_path):
    assert file_url_path(f"file://{tmp_path}/x/../a.tar.gz", "/elsewhere", "/nowhere") == f"{tmp_path}/a.tar.gz"
    assert file_url_path(f"file://localhost{tmp_path}/a.tar.gz") == f"{tmp_path}/a.tar.gz"
    assert locate_file_url(f"file://{tmp_path}/a.tar.gz").where() == "an absolute path"
    assert file_url_path("https://example.org/a.tar.gz") is None
    with pytest.raises(PipelineError, match="names host 'server'"):
        file_url_path("file://server/a.tar.gz")
    with pytest.raises(PipelineError, match="has no path"):
        file_url_path("file:")


def test_workflow_dir_is_snakemakes_else_this_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv(WORKFLOW_DIR_ENV, str(tmp_path))
    assert default_workflow_dir() == str(tmp_path)
    monkeypatch.delenv(WORKFLOW_DIR_ENV)
    # `make setup` installs the package from the checkout (pip install -e .): its Snakefile is there
    assert default_workflow_dir() == str(ROOT)


# --- what reads it ---------------------------------------------------------------------------------


def test_config_check_finds_the_sample_from_another_directory(other):
    cfg = load(str(other / "config.yaml"))
    assert cfg["data"]["url"] == SAMPLE_URL  # the config keeps what the user wrote


def test_config_check_names_both_places_when_missing(other, tmp_path):
    workflow = tmp_path / "workflow"
    workflow.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({
        **yaml.safe_load((ROOT / "config.yaml").read_text()),
        "data": {"url": "file:assets/missing.tar.gz", "sha256": "0" * 64}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(WORKFLOW_DIR_ENV, str(workflow))
        with pytest.raises(PipelineError) as err:
            load(str(other / "config.yaml"))
    assert (f"data.url (file:assets/missing.tar.gz): no such file {other}/assets/missing.tar.gz, "
            f"nor {workflow}/assets/missing.tar.gz") in str(err.value)


def test_container_mounts_the_workflows_sample(other):
    """runtime container: the project is mounted whole; the sample, outside it, read-only."""
    cfg = load(str(other / "config.yaml"))
    assert user_paths("download_data", cfg, str(other)) == [str(SAMPLE)]
    (other / "assets").mkdir()
    shutil.copy2(SAMPLE, other / "assets" / SAMPLE.name)  # the project's own copy: inside, no mount
    assert user_paths("download_data", cfg, str(other)) == []


def test_download_reads_the_workflows_sample_and_says_so(other, caplog):
    caplog.set_level(logging.INFO, logger="llamapipe.download")
    digest = download.sha256_file(SAMPLE)
    summary = download.run(SAMPLE_URL, digest, "data/AdvertiseGen", "data/downloads")
    assert summary["files"] == ["dev.json", "train.json"]
    assert (f"{SAMPLE_URL} resolves to {SAMPLE} (not in the project directory {other}; found in the "
            f"workflow's directory {ROOT})") in caplog.text
    record = json.loads((other / "data" / "AdvertiseGen" / download.RECORD).read_text())
    assert (record["url"], record["path"], record["path_base"]) == (SAMPLE_URL, str(SAMPLE), "workflow")
    assert (other / "data" / "downloads" / SAMPLE.name).read_bytes() == SAMPLE.read_bytes()  # a copy in OTHER


def test_download_prefers_the_projects_own_file(other, caplog):
    caplog.set_level(logging.INFO, logger="llamapipe.download")
    (other / "assets").mkdir()
    own = other / "assets" / SAMPLE.name
    shutil.copy2(SAMPLE, own)
    download.run(SAMPLE_URL, download.sha256_file(SAMPLE), "data/AdvertiseGen", "data/downloads")
    assert f"{SAMPLE_URL} resolves to {own} (in the project directory {other})" in caplog.text


# --- snakemake -d OTHER ----------------------------------------------------------------------------


def _other_project(tmp_path: Path) -> Path:
    project = tmp_path / "other"
    project.mkdir()
    shutil.copy2(ROOT / "config.yaml", project / "config.yaml")
    return project


def test_dry_run_in_another_directory(tmp_path):
    """`snakemake -n -d OTHER results/metrics.json`, from the checkout, as the README's user types it."""
    project = _other_project(tmp_path)
    out = snakemake(ROOT, "-n", "-d", str(project), "results/metrics.json").stdout
    assert "This was a dry-run" in out and "download_data" in out
    assert f"Working directory: {project}" in out or str(project) in out
    assert (project / ".snakemake").is_dir()  # Snakemake's state is OTHER's, not the checkout's


@pytest.mark.e2e
def test_early_stages_run_in_another_directory(tmp_path):
    """`snakemake --cores 2 -d OTHER results/data/train.json` for real: preflight, download_data
    (the checkout's sample, said so in its log) and prepare_data write under OTHER."""
    project = _other_project(tmp_path)
    snakemake(ROOT, "--cores", "2", "-d", str(project), "results/data/train.json", timeout=600)
    train = project / "results" / "data" / "train.json"
    assert train.is_file() and len(train.read_text(encoding="utf-8").splitlines()) == 480
    log = (project / "results" / "logs" / "download_data.log").read_text()
    assert (f"{SAMPLE_URL} resolves to {SAMPLE} (not in the project directory {project}; found in the "
            f"workflow's directory {ROOT})") in log, log
    record = json.loads((project / "data" / "AdvertiseGen" / download.RECORD).read_text())
    assert (record["path"], record["path_base"]) == (str(SAMPLE), "workflow")
    assert (project / "results" / "preflight.json").is_file()
