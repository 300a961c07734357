"""Benchmarks cannot rot: each runs once in --quick mode (about 2 minutes in all).

Only completion and the reported keys are checked, never a timing: the machine is shared and noisy.
The PyTorch peer needs `make bench-setup` (which `make test` runs first).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"median", "min", "max", "runs"}


def run_quick(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--json-out", str(out),
                           *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["machine"]["cores"] >= 1
    return result


def is_summary(value: dict, runs: int = 1) -> bool:
    return set(value) >= SUMMARY_KEYS and value["runs"] == runs and value["min"] <= value["median"] <= value["max"]


@pytest.mark.e2e
def test_pipeline_speed_quick(tmp_path):
    r = run_quick("pipeline_speed", tmp_path)
    for key in ("pipeline_wall_seconds", "stage_jobs_seconds", "stage_reported_seconds", "orchestration_share"):
        assert is_summary(r[key]), key
    assert set(r["per_stage"]) >= {"prepare_data", "init_model", "sft", "merge", "export", "predict"}
    for stage in r["per_stage"].values():
        assert is_summary(stage["max_rss_mib"]) and is_summary(stage["job_seconds"])
    assert set(r["compute_seconds_last_run"]) == {"sft", "predict"}


@pytest.mark.e2e
def test_stage_costs_quick(tmp_path):
    r = run_quick("stage_costs", tmp_path)
    assert set(r["seconds"]) == {"python", "cli", "paddle_only", "paddle_import", "transformers_part",
                                 "trainer_import", "model_load"}
    assert all(is_summary(v) for v in r["seconds"].values())
    rss = {k: v["median"] for k, v in r["max_rss_mib"].items()}
    assert rss["paddle_import"] > rss["transformers_part"] > rss["paddle_only"] > rss["python"]


@pytest.mark.e2e
def test_sft_throughput_quick(tmp_path):
    r = run_quick("sft_throughput", tmp_path)
    assert r["torch"] == "measured", r["torch"]  # make bench-setup installs the PyTorch peer
    assert set(r["tokens_per_second"]) == {"stage", "paddle", "torch"}
    assert all(is_summary(v) and v["median"] > 0 for v in r["tokens_per_second"].values())
    assert set(r["ratios"]) == {"stage_over_paddle_bare", "stage_over_torch", "torch_over_paddle_bare"}
    for runs in r["runs"].values():  # every contender trained: its loss went down over the steps
        assert runs[0]["final_loss"] < runs[0]["first_loss"]


@pytest.mark.e2e
def test_sft_processes_quick(tmp_path):
    r = run_quick("sft_processes", tmp_path)
    assert set(r["tokens_per_second"]) == {"1_process", "2_process"}
    assert all(is_summary(v) and v["median"] > 0 for v in r["tokens_per_second"].values())
    assert is_summary(r["ratio_2_over_1"]["tokens_per_second"])


@pytest.mark.e2e
def test_inference_speed_quick(tmp_path):
    r = run_quick("inference_speed", tmp_path)
    assert set(r["results"]) == {"batch_1", "batch_8"}
    for entry in r["results"].values():
        for mode in ("static", "static_shipped", "dygraph"):
            assert entry[mode]["identical_tokens"] is True, mode  # same tokens as dygraph greedy
            assert entry[mode]["tokens"] > 0 and is_summary(entry[mode]["tokens_per_second"])
        assert is_summary(entry["static_speedup_over_dygraph"])


@pytest.mark.e2e
def test_prepare_data_scale_quick(tmp_path):
    r = run_quick("prepare_data_scale", tmp_path)
    assert r["train_records"] == 5000
    assert is_summary(r["seconds"]) and is_summary(r["records_per_second"])


@pytest.mark.e2e
def test_dry_run_quick(tmp_path):
    r = run_quick("dry_run", tmp_path)
    assert set(r["seconds"]) == {"default", "npu"}
    assert all(is_summary(v) for v in r["seconds"].values())


def test_run_all_table_renders_every_benchmark(tmp_path):
    """run_all's markdown table from the recorded shape of each result (no benchmark is run)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "bench"))
    s = {"median": 1.0, "min": 0.9, "max": 1.1, "runs": 5}
    stage = {"job_seconds": s, "reported_seconds": 1.0, "max_rss_mib": s}
    results = {
        "pipeline_speed": {k: s for k in ("pipeline_wall_seconds", "stage_jobs_seconds", "orchestration_share",
                                          "outside_reported_share", "outside_compute_share")}
        | {"per_stage": {"sft": stage, "predict": stage}},
        "stage_costs": {"seconds": dict.fromkeys(("python", "cli", "paddle_import", "trainer_import", "model_load"), s),
                        "max_rss_mib": dict.fromkeys(("python", "cli", "paddle_import", "trainer_import",
                                                      "model_load"), s)},
        "sft_throughput": {"tokens_per_second": {"stage": s, "paddle": s}, "torch": "not installed",
                           "ratios": {"stage_over_paddle_bare": s}},
        "inference_speed": {"results": {"batch_8": {"static": {"tokens_per_second": s, "identical_tokens": True},
                                                    "static_speedup_over_dygraph": s}}},
        "sft_processes": {"tokens_per_second": {"1_process": s, "2_process": s},
                          "ratio_2_over_1": {"tokens_per_second": s}},
        "prepare_data_scale": {"train_records": 10, "dev_records": 1, "input_mib": 0.1, "seconds": s,
                               "records_per_second": s},
        "dry_run": {"seconds": {"default": s, "npu": s}},
    }
    md = run_all.table(results)
    assert md.count("\n") > 15
    for text in ("orchestration share", "bare Paddle loop", "2 processes / 1 process", "batch 8, static / dygraph",
                 "`snakemake -n`, npu DAG", "sft: peak RSS", "not installed"):
        assert text in md


@pytest.mark.e2e
def test_serve_throughput_quick(tmp_path):
    """Makes its own cpu run (sft 20 steps); flask_server.py too when LLAMAPIPE_PADDLENLP_SRC names a checkout
    (a one-process rehearsal of 10 steps), else that variant is reported as skipped."""
    import os

    r = run_quick("serve_throughput", tmp_path)
    expected = {"sequential@1", "batched@16", *(f"server@{c}" for c in (1, 4, 16))}
    if os.environ.get("LLAMAPIPE_PADDLENLP_SRC"):
        expected |= {f"flask@{c}" for c in (1, 4, 16)}
    else:
        assert "flask" in r["skipped"]
    assert set(r["results"]) >= expected
    for name, entry in r["results"].items():
        assert entry["errors"] == 0, name
        for key in ("requests_per_s", "p50_s", "p95_s"):
            assert is_summary(entry[key]) and entry[key]["median"] > 0, (name, key)
        if name.startswith("server"):  # our server reports the batches it decoded: every request in one
            assert sum(int(k) * v for k, v in entry["batch_sizes"].items()) == r["requests"], name
    assert {"server@16 / sequential", "server@16 / server@1"} <= set(r["ratios"])
    assert all(v["median"] > 0 for v in r["ratios"].values())
    for variant in expected:
        assert f"| {variant.split('@')[0]} | {variant.split('@')[1]} |" in r["table"]
