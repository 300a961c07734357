"""Shared fixtures: the project root, and throw-away copies of the project for real runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The Docker engine and image fixtures are session-wide: registered once here, so every test
# module shares one engine (a fixture imported into two modules would be two fixtures, and the
# second would wait forever on the first's cache lock).
from docker_engine import base_image, cpu_image, docker_engine  # noqa: F401,E402
from slurm_cluster import slurm_cluster  # noqa: F401,E402  (session: one cluster for all SLURM tests)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SNAKEMAKE = [PYTHON, "-m", "snakemake"]

# A LLaMA small enough to build in milliseconds, for in-process checkpoint and merge tests.
TINY_LLAMA = dict(
    vocab_size=400,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

# What a fresh clone holds that a run needs (results/, data/ and .snakemake/ are left behind).
PROJECT_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "assets", "envs", "Dockerfile.npu",
                 ".dockerignore")


def copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; on failure show its output and the rule logs."""
    proc = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        logs = "".join(
            f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results/logs").glob("*.log"))
        ) if (workdir / "results/logs").exists() else ""
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}{logs}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> set:
    """Rule names a dry-run would execute (from the job-stats table)."""
    out = snakemake(workdir, "-n", *args).stdout
    jobs = set()
    in_table = False
    for line in out.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and not parts:
            break
        if in_table and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            jobs.add(parts[0])
    return jobs - {"all"}


@pytest.fixture
def project_copy(tmp_path):
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The default pipeline run exactly as users type it, then asked for the metrics and the
    report too: one for the session (the e2e, serving and chat tests read it; a test that
    changes it puts it back)."""
    reuse = os.environ.get("LLAMAPIPE_TEST_FINISHED_RUN")  # a developer's shortcut, never set by CI
    if reuse:
        project = tmp_path_factory.mktemp("run") / "project"
        shutil.copytree(reuse, project, symlinks=True)
        return project
    project = copy_project(tmp_path_factory.mktemp("run") / "project")
    snakemake(project, "--cores", "8", "results/predictions.json")
    snakemake(project, "--cores", "2")  # the default target: metrics, plots, tables, provenance
    snakemake(project, "--report", "results/report.html")
    return project
