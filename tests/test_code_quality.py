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


def test_import_rules_hold():
    """docs/architecture.md's import rules, as import-linter contracts (pyproject.toml)."""
    proc = _run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_parse_time_code_imports_no_paddle():
    """What Snakemake imports while parsing (config resolution, every rule's command on both targets)
    pulls in neither Paddle, PaddleNLP nor numpy: a dry-run stays fast and works with only Snakemake and
    the config dependencies (`make dry-run`'s light venv)."""
    code = (
        "import sys\n"
        "from llamapipe.config import load\n"
        "from llamapipe.runners.commands import rule_command\n"
        "for target in ('cpu', 'npu'):\n"
        "    cfg = load('config.yaml') if target == 'cpu' else None\n"
        "    if cfg is None:\n"
        "        import yaml, tempfile\n"
        "        raw = yaml.safe_load(open('config.yaml'))\n"
        "        raw['target'] = 'npu'\n"
        "        f = tempfile.NamedTemporaryFile('w', suffix='.yaml', delete=False)\n"
        "        yaml.safe_dump(raw, f)\n"
        "        f.close()\n"
        "        cfg = load(f.name)\n"
        "    for rule in ('preflight', 'sft', 'merge', 'export', 'predict', 'plan', 'smoke_collective'):\n"
        "        rule_command(rule, cfg, '.')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paddle', 'paddlenlp', 'numpy')))\n"
    )
    proc = _run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
