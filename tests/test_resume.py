"""Which checkpoint a rerun resumes from (fast: no training)."""

from __future__ import annotations

import json
import logging

import pytest

from llamapipe.core import checkpoint_io
from llamapipe.stages import sft


def _ckpt(root, step, complete):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model_state.pdparams").write_bytes(b"w")
    if complete:
        (d / ".checkpoint_done").write_bytes(b"x")
    return d


FP = {"params": "p", "train_data": "d", "base_model": "b"}


def _run_dir(tmp_path):
    """A checkpoint directory of the same training run (matching fingerprint)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "fingerprint.json").write_text(json.dumps(FP))
    return root


def test_resume_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    root = _run_dir(tmp_path)
    _ckpt(root, 10, complete=True)
    good = _ckpt(root, 20, complete=True)
    _ckpt(root, 30, complete=False)  # killed while saving: no completion marker
    sft.prepare_checkpoint_dir(root, FP)
    assert sft.last_checkpoint(root) == str(good)


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    root = _run_dir(tmp_path)
    _ckpt(root, 10, complete=False)
    sft.prepare_checkpoint_dir(root, FP)
    assert sft.last_checkpoint(root) is None


def _names(root):
    return sorted((p.name for p in root.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    root = _run_dir(tmp_path)
    for step in (10, 20, 30, 40):
        _ckpt(root, step, complete=True)
    assert checkpoint_io.prune_checkpoints(root, 2) == ["checkpoint-10", "checkpoint-20"]
    assert _names(root) == ["checkpoint-30", "checkpoint-40"]


def test_prune_never_counts_or_keeps_a_broken_save_behind_a_complete_one(tmp_path):
    root = _run_dir(tmp_path)
    _ckpt(root, 10, complete=True)
    _ckpt(root, 20, complete=False)  # killed while saving; the rerun resumed from 10 and went on
    _ckpt(root, 30, complete=True)
    _ckpt(root, 40, complete=False)  # newer than every complete one: maybe being written, left alone
    assert checkpoint_io.prune_checkpoints(root, 2) == ["checkpoint-20"]
    assert _names(root) == ["checkpoint-10", "checkpoint-30", "checkpoint-40"]
    assert checkpoint_io.prune_checkpoints(root, 0) == []  # 0: no limit, as in PaddleNLP


def test_collect_sft_applies_save_total_limit(tmp_path):
    from llamapipe.stages import collect

    root = _run_dir(tmp_path)
    for step in (100, 200, 300):
        _ckpt(root, step, complete=True)
    (root / "config.json").write_text("{}")
    (root / "model_state.pdparams").write_bytes(b"w")
    collect.collect_sft(str(root), str(tmp_path / "sft"), save_total_limit=2)
    assert _names(root) == ["checkpoint-200", "checkpoint-300"]


# --- asking for sft again: a finished run's checkpoints are set aside, a crashed run's resumed ------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def sft_log():
    handler, logger = _Records(), logging.getLogger("llamapipe.sft")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


# (run_state.json, complete checkpoints, an incomplete one) -> moved aside?
CASES = {
    "finished": ({"max_steps": 6, "completed": True, "global_step": 6}, [3, 6], None, True),
    "killed after its last checkpoint, before its output": ({"max_steps": 6, "completed": False}, [3, 6], None, False),
    "crashed": ({"max_steps": 6, "completed": False}, [3], 6, False),
    # from before run_state.json: resumed as it always was (no retraining on the upgrade's rerun)
    "no run_state, all steps checkpointed": (None, [3, 6], None, False),
    "no run_state, crashed": (None, [3], None, False),
    "no run_state, last save cut short": (None, [3], 6, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_finished_runs_checkpoints_are_set_aside_a_crashed_runs_kept(tmp_path, sft_log, case):
    state, complete, broken, moved = CASES[case]
    root = _run_dir(tmp_path)
    if state is not None:
        (root / checkpoint_io.RUN_STATE).write_text(json.dumps(state))
    for step in complete:
        _ckpt(root, step, complete=True)
    if broken:
        _ckpt(root, broken, complete=False)
    sft.prepare_checkpoint_dir(root, FP, max_steps=6)
    aside = sorted(tmp_path.glob("ckpt.stale-*"))
    assert json.loads((root / "fingerprint.json").read_text()) == FP
    assert json.loads((root / checkpoint_io.RUN_STATE).read_text()) == {"max_steps": 6, "completed": False}
    if moved:
        assert len(aside) == 1 and _names(aside[0]) == [f"checkpoint-{s}" for s in complete]
        assert _names(root) == []
        assert sft.last_checkpoint(root) is None
        assert f"{root} holds a finished run" in sft_log[0] and f"moved to {aside[0]}" in sft_log[0]
    else:
        assert not aside and not sft_log
        assert sft.last_checkpoint(root) == str(root / f"checkpoint-{complete[-1]}")


def test_a_run_marked_completed_is_set_aside_when_asked_again(tmp_path, sft_log):
    root = tmp_path / "ckpt"
    sft.prepare_checkpoint_dir(root, FP, max_steps=6)
    _ckpt(root, 3, complete=True)  # not all steps: a rerun resumes
    sft.prepare_checkpoint_dir(root, FP, max_steps=6)
    assert _names(root) == ["checkpoint-3"]
    checkpoint_io.mark_completed(root, 6)  # the output written (what run() does last)
    sft.prepare_checkpoint_dir(root, FP, max_steps=6)
    assert _names(root) == [] and len(list(tmp_path.glob("ckpt.stale-*"))) == 1
    assert sft_log == [f"{root} holds a finished run (all 6 of 6 steps done): moved to "
                       f"{next(tmp_path.glob('ckpt.stale-*'))} (delete it when no longer needed); "
                       "training again from scratch"]


def test_two_set_asides_in_one_second_do_not_collide(tmp_path):
    root = tmp_path / "ckpt"
    first = []
    for _ in range(3):
        root.mkdir()
        (root / "x").write_text(str(len(first)))
        first.append(checkpoint_io.set_aside(root))
    assert len(set(first)) == 3 and [(p / "x").read_text() for p in first] == ["0", "1", "2"]
