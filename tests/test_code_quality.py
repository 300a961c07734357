"""Stage code runs inside the py39 paddle-npu image; the workflow must lint clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_package_is_python39_compatible():
    # the whole package: stage code, and llamapipe.npu.ascend_checks (rule preflight_image runs it in the
    # image; test_ascend_checks.py checks it imports only the stdlib)
    proc = _run(str(BIN / "vermin"), "-t=3.9-", "--no-tips", "--violations", "--eval-annotations",
                "--backport", "dataclasses", "src/llamapipe")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakemake_lint_clean():
    proc = _run(sys.executable, "-m", "snakemake", "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt_clean():
    proc = _run(str(BIN / "snakefmt"), "--check", "Snakefile", "workflow")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_clean():
    proc = _run(str(BIN / "ruff"), "check", "src", "tests", "tools")
    assert proc.returncode == 0, proc.stdout + proc.stderr
