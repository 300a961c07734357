"""Inconsistent configs stop the real command before any job: non-zero exit, the offending keys
named, nothing under results/ (llamapipe.config.rules, called by config.resolve at parse time).

``--configfile`` extends the Snakefile's config.yaml (Snakemake merges nested keys), so each bad
config is only the keys it breaks.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import copy_project, snakemake

MULTI_NODE = {"nodes": 2, "master": "10.0.0.1:8090", "ips": "10.0.0.1,10.0.0.2"}

# (what breaks, bad config, keys the message must name)
BAD_CONFIGS = [
    ("model shape, cpu", {"model": {"hidden_size": 130}},
     ["model.hidden_size (130)", "model.num_attention_heads (4)"]),
    ("model shape, rehearsal", {"target": "npu", "rehearsal": "cpu", "model": {"num_key_value_heads": 3}},
     ["model.num_key_value_heads (3)"]),
    ("lengths, cpu", {"sft": {"src_length": 200}, "export": {"max_new_tokens": 300}},
     ["sft.src_length (200)", "sft.max_length (160)", "sft.src_length + export.max_new_tokens"]),
    ("lengths, npu", {"target": "npu", "npu": {"export": {"max_new_tokens": 3500}}},
     ["npu.sft.src_length + npu.export.max_new_tokens (1024 + 3500 = 4524)"]),
    ("cadence, cpu", {"sft": {"save_steps": 5000, "logging_steps": 5000}},
     ["sft.save_steps (5000)", "sft.logging_steps (5000)", "sft.max_steps (1000)"]),
    ("cadence, npu", {"target": "npu", "npu": {"sft": {"warmup_steps": 100}}},
     ["npu.sft.warmup_steps (100)", "npu.sft.max_steps (100)"]),
    ("cards, npu", {"target": "npu", "devices": "0,1,1,2,3,4,5,9"},
     ["devices (0,1,1,2,3,4,5,9)", "listed twice", "npu.cards_per_node (8)"]),
    ("nodes, npu", {"target": "npu", "npu": {**MULTI_NODE, "master": None, "ips": "10.0.0.1"}},
     ["npu.master", "npu.ips (10.0.0.1)", "npu.nodes (2)"]),
    ("download source, cpu", {"data": {"url": "file:assets/missing.tar.gz"}},
     ["data.url (file:assets/missing.tar.gz)", "no such file"]),
    # on npu the data comes from npu.data (it overlays data: the guide's archive by default)
    ("download source, npu", {"target": "npu", "npu": {"data": {"url": "https://example.org/datasets/"}}},
     ["npu.data.url (https://example.org/datasets/)", "names no file"]),
    ("schema, all at once", {"seed": "abc", "threads": 0, "sft": {"max_step": 5}},
     ['seed = "abc": must be a whole number', "threads = 0: must be at least 1",
      "sft.max_step: unknown key; did you mean sft.max_steps?"]),
    ("schema, npu overlay", {"target": "npu", "npu": {"sft": {"max_stpes": 5, "warmup_steps": "twenty"}}},
     ["npu.sft.max_stpes: unknown key; did you mean npu.sft.max_steps?",
      'npu.sft.warmup_steps = "twenty": must be a whole number']),
    ("local model, npu", {"target": "npu", "npu": {"model_name_or_path": "/models/my-llama"}},
     ["npu.model_name_or_path (/models/my-llama)", "set npu.model_config"]),
]


@pytest.mark.e2e
def test_bad_configs_stop_before_any_job_naming_the_keys(tmp_path):
    failures = []
    for i, (what, bad, named) in enumerate(BAD_CONFIGS):
        project = copy_project(tmp_path / f"project{i}")
        (project / "bad.yaml").write_text(yaml.safe_dump(bad))
        proc = snakemake(project, "--cores", "1", "results/predictions.json", "--configfile", "bad.yaml",
                         check=False, timeout=120)
        message = proc.stdout + proc.stderr
        missing = [key for key in named if key not in message]
        written = sorted(str(p.relative_to(project)) for p in (project / "results").rglob("*"))
        if proc.returncode == 0 or missing or written:
            failures.append(f"{what}: exit {proc.returncode}, not named {missing}, written {written}\n"
                            f"{message[-2000:]}")
    assert not failures, "\n\n".join(failures)
