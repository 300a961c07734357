"""Which checkpoint a rerun resumes from (fast: no training)."""

from __future__ import annotations

import json

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
    assert sft.prepare_checkpoint_dir(root, FP) == str(good)


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    root = _run_dir(tmp_path)
    _ckpt(root, 10, complete=False)
    assert sft.prepare_checkpoint_dir(root, FP) is None
