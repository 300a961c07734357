"""A crash costs nothing: sft killed between checkpoints and resumed ends where a clean run ends.

Two real runs of the cpu DAG with the same seed and config: one uninterrupted, one whose sft is
SIGKILLed right after it logged a step that is not a checkpoint step, then rerun with the same
command. Predictions must be byte-identical and the per-step losses equal; the checkpoint count
must stay within ``save_total_limit`` after the run and after the resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_project, snakemake

pytestmark = pytest.mark.e2e

OVERLAY = """\
sft:
  max_steps: 130
  save_steps: 40
  save_total_limit: 2
predict:
  limit: 16
"""
KILL_AFTER_STEP = 97  # two complete checkpoints behind it (40, 80), 17 steps of work past the last

# Test hook: SIGKILL the process once the loss log holds KILL_AFTER_STEP lines, i.e. when the
# trainer opens it to append the next step. Deterministic, unlike a kill timed from outside.
KILL_HOOK = """\
import builtins, os, signal
_open, _after = builtins.open, int(os.environ.get("KILL_AFTER_STEP", "0"))
def _killing_open(file, mode="r", *args, **kwargs):
    if _after and str(file).endswith("train_log.jsonl") and "a" in mode and os.path.exists(file):
        with _open(file) as f:
            if sum(1 for _ in f) >= _after:
                os.kill(os.getpid(), signal.SIGKILL)
    return _open(file, mode, *args, **kwargs)
builtins.open = _killing_open
"""


def _losses(project: Path) -> dict[int, float]:
    lines = (project / "results/sft/train_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


def _checkpoints(project: Path) -> list[str]:
    found = (project / "results/checkpoints/sft").glob("checkpoint-*")
    return [p.name for p in sorted(found, key=lambda p: int(p.name.split("-")[1]))]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("clean") / "project")
    (project / "overlay.yaml").write_text(OVERLAY)
    snakemake(project, "results/predictions.json", "--cores", "2", "--configfile", "overlay.yaml")
    return project


def test_save_total_limit_holds_after_a_run(clean_run):
    assert _checkpoints(clean_run) == ["checkpoint-80", "checkpoint-120"]


def test_a_run_killed_between_checkpoints_resumes_to_the_same_result(clean_run, tmp_path):
    project = copy_project(tmp_path / "killed")
    (project / "overlay.yaml").write_text(OVERLAY)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    args = ["results/predictions.json", "--cores", "2", "--configfile", "overlay.yaml"]

    crashed = snakemake(project, *args, check=False,
                        env={"PYTHONPATH": str(hook), "KILL_AFTER_STEP": str(KILL_AFTER_STEP)})
    assert crashed.returncode != 0
    log = project / "results/checkpoints/sft/train_log.jsonl"
    assert len(log.read_text().splitlines()) == KILL_AFTER_STEP
    assert KILL_AFTER_STEP % 40  # not a checkpoint step: the resume must redo work
    assert _checkpoints(project) == ["checkpoint-40", "checkpoint-80"]
    assert not (project / "results/sft").exists()  # the failed job's output is gone, the checkpoints stay

    snakemake(project, *args)  # the same command, nothing else
    summary = json.loads((project / "results/sft/train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-80")
    assert _checkpoints(project) == ["checkpoint-80", "checkpoint-120"]

    clean, resumed = _losses(clean_run), _losses(project)
    assert sorted(resumed) == list(range(1, 131))
    diverged = [s for s in clean if clean[s] != resumed[s]]
    assert not diverged, f"losses differ from step {diverged[0]}: {clean[diverged[0]]} vs {resumed[diverged[0]]}"
    assert (project / "results/predictions.json").read_bytes() == (clean_run / "results/predictions.json").read_bytes()
