"""Benchmarks cannot rot: each runs once in --quick mode (no timing asserts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_pipeline_speed_quick_runs_and_reports(capsys):
    spec = importlib.util.spec_from_file_location("pipeline_speed", ROOT / "bench/pipeline_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    assert result["pipeline_wall_seconds"]["runs"] == 1
    assert set(result["per_stage_seconds_last_run"]) >= {"sft", "export", "predict"}
