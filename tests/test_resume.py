"""Which checkpoint a rerun resumes from (fast: no training)."""

from __future__ import annotations

import json

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
