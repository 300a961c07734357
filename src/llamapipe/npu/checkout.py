"""A PaddleNLP checkout at the pinned commit, for the rehearsal when none is given.

``git clone --no-checkout`` then ``git checkout <commit>`` into a temporary directory beside the
target, checked for the scripts the NPU stages run, then renamed into place: an interrupted or
failed clone leaves nothing that looks usable. Needs the network (GitHub); where there is none,
the error says how to point the rehearsal at an existing checkout instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from llamapipe.core.errors import PipelineError

log = logging.getLogger("llamapipe.npu.checkout")

CHECKOUT_ENV = "LLAMAPIPE_PADDLENLP_SRC"  # a checkout made elsewhere (no network to GitHub here)
# What a usable checkout holds (the scripts the NPU stages run, the ops package build_ops builds).
CHECKOUT_FILES = (
    "llm/run_finetune.py",
    "llm/predict/export_model.py",
    "llm/predict/predictor.py",
    "llm/tools/merge_lora_params.py",
    "llm/tools/merge_tp_and_pp_params.py",
    "llm/devices/npu/llama/export_utils.py",
    "csrc/npu/setup.py",
)


def missing_files(checkout: str, required: tuple = CHECKOUT_FILES) -> list[str]:
    """The files of ``required`` that ``checkout`` lacks (empty: usable)."""
    return [f for f in required if not os.path.isfile(os.path.join(checkout, f))]


def _git(*args: str, cwd: str | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def clone(repo: str, commit: str, out: str, required: tuple = CHECKOUT_FILES) -> dict:
    if shutil.which("git") is None:
        raise PipelineError(f"git is not installed: install it, or set {CHECKOUT_ENV}=<a PaddleNLP checkout>")
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        log.info("cloning %s (commit %s) -> %s", repo, commit, out)
        try:
            _git("clone", "--no-checkout", "--quiet", repo, tmp)
        except PipelineError as exc:
            raise PipelineError(f"{exc}\n  no network to {repo}? Set {CHECKOUT_ENV}=<dir> to a checkout at "
                                f"{commit} made elsewhere") from None
        _git("checkout", "--quiet", commit, cwd=tmp)
        head = _git("rev-parse", "HEAD", cwd=tmp)
        if not head.startswith(commit):
            raise PipelineError(f"{repo}: {commit} resolved to {head}")
        missing = missing_files(tmp, required)
        if missing:
            raise PipelineError(f"{repo} at {head} lacks {', '.join(missing)}")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("PaddleNLP %s at %s", head, out)
    return {"repo": repo, "commit": head, "path": out}
