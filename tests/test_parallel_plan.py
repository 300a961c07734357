"""Parallel-strategy planner: hand-computed memory numbers, layout checks, the 13b plan, the CLI."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from llamapipe.core.errors import PipelineError
from llamapipe.scaleout import plan_cli
from llamapipe.scaleout.planner import (
    COMPUTE_FLOPS_PER_S,
    FRAMEWORK_OVERHEAD_GB,
    GB,
    KNOWN_MODELS,
    ModelShape,
    ParallelLayout,
    TrainSetup,
    activation_bytes_per_layer,
    check_layout,
    estimate_cost,
    estimate_memory,
    format_table,
    group_spans_nodes,
    layout_notes,
    model_state_bytes_per_param,
    plan,
    stage_parameters,
    to_json,
)

L13 = ModelShape.from_dict(KNOWN_MODELS["meta-llama/Llama-2-13b"])
L7 = ModelShape.from_dict(KNOWN_MODELS["meta-llama/Llama-2-7b"])
L70 = ModelShape.from_dict(KNOWN_MODELS["meta-llama/Llama-2-70b"])
UPSTREAM = TrainSetup()  # llama_npu_sft_N1C8.sh
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 1000, "intermediate_size": 128}


def _layouts(cands):
    return [c.layout for c in cands]


# ---- memory formulas, by hand ---------------------------------------------------------------


def test_mixed_precision_adam_16_bytes_per_param_and_zero_paper_example():
    # ZeRO paper (Rajbhandari et al. 2020), 7.5B parameters on 64 cards.
    base = model_state_bytes_per_param("bf16", master_grad=False, sharding_stage=0, sharding_degree=1)
    assert base == {"params": 2.0, "grads": 2.0, "optimizer": 12.0}
    assert 7.5e9 * sum(base.values()) / GB == pytest.approx(120.0)
    pos = model_state_bytes_per_param("bf16", False, 1, 64)
    assert 7.5e9 * sum(pos.values()) / GB == pytest.approx(31.4, abs=0.05)
    pos_g = model_state_bytes_per_param("bf16", False, 2, 64)
    assert 7.5e9 * sum(pos_g.values()) / GB == pytest.approx(16.6, abs=0.05)
    pos_g_p = model_state_bytes_per_param("bf16", False, 3, 64)
    assert 7.5e9 * sum(pos_g_p.values()) / GB == pytest.approx(1.9, abs=0.05)
    # fp32 Adam: 4 + 4 + 8; amp_master_grad keeps fp32 grads: 2 + 4 + 12
    assert sum(model_state_bytes_per_param("fp32", False, 0, 1).values()) == 16.0
    assert sum(model_state_bytes_per_param("bf16", True, 0, 1).values()) == 18.0
    # a sharding stage over degree 1 changes nothing
    assert model_state_bytes_per_param("bf16", True, 3, 1) == model_state_bytes_per_param("bf16", True, 0, 1)


def test_megatron_activation_formula_by_hand():
    s, b, h, a = 2048, 1, 1024, 16
    sbh = 2048 * 1024  # 2,097,152; 5*a*s/h = 160
    assert activation_bytes_per_layer(s, b, h, a) == sbh * (34 + 160) == 406_847_488
    assert activation_bytes_per_layer(s, b, h, a, tp=4, sequence_parallel=True) == 406_847_488 / 4
    assert activation_bytes_per_layer(s, b, h, a, tp=4) == sbh * (10 + 24 / 4 + 160 / 4) == 117_440_512
    assert activation_bytes_per_layer(s, b, h, a, flash_attention=True) == sbh * 34 == 71_303_168
    assert activation_bytes_per_layer(s, b, h, a, recompute=True) == 2 * sbh == 4_194_304
    assert activation_bytes_per_layer(s, b, h, a, tp=4, sequence_parallel=True, recompute=True) == 2 * sbh / 4
    assert activation_bytes_per_layer(s, b, h, a, element_scale=2.0) == 2 * 406_847_488


def test_parameter_counts_of_llama2():
    assert L13.num_parameters() == 13_015_864_320  # 40*(4*5120^2 + 3*5120*13824 + 2*5120) + 2*32000*5120 + 5120
    assert L13.num_parameters() == pytest.approx(13.0e9, rel=0.01)
    assert L7.num_parameters() == pytest.approx(6.74e9, rel=0.01)
    assert L70.num_parameters() == pytest.approx(68.98e9, rel=0.01)  # GQA: k, v are h x 1024
    assert L70.layer_parameters()["attention"] == 2 * 8192 * 8192 + 2 * 8192 * 1024


def test_13b_tp8_memory_by_hand():
    mem = estimate_memory(L13, UPSTREAM, ParallelLayout(8, 1, 1, 1))
    params = 40 * ((4 * 5120**2 + 3 * 5120 * 13824) / 8 + 2 * 5120) + 2 * 32000 * 5120 / 8 + 5120
    assert mem.params_per_card == pytest.approx(params) == pytest.approx(1_627_345_920)
    assert mem.params_gb == pytest.approx(params * 2 / GB)
    assert mem.grads_gb == pytest.approx(params * 4 / GB)  # amp_master_grad: fp32 grads
    assert mem.optimizer_gb == pytest.approx(params * 12 / GB)  # sharding degree 1: not sharded
    acts = 40 * 4096 * 2 * 5120 * 34 / 8 + 4 * 4096 * 2 * 32000 / 8  # sp + flash; fp32 logits
    assert mem.activations_gb == pytest.approx(acts / GB)
    assert mem.total_gb == pytest.approx((params * 18 + acts) / GB + FRAMEWORK_OVERHEAD_GB)
    assert mem.fits and mem.stage == "only"


def test_pipeline_first_stage_holds_pp_micro_batches():
    setup = TrainSetup(sequence_parallel=True)
    one = activation_bytes_per_layer(4096, 2, 5120, 40, tp=2, sequence_parallel=True, flash_attention=True)
    mem = estimate_memory(L13, setup, ParallelLayout(2, 4, 1, 1))
    assert mem.stage == "first"
    assert mem.activations_gb == pytest.approx(10 * one * 4 / GB)  # 40/4 layers, min(pp, 64) = 4 in flight


def test_cost_model_terms():
    lay = ParallelLayout(2, 4, 1, 1)
    cost = estimate_cost(L13, UPSTREAM, lay)
    assert cost.bubble == pytest.approx(3 / 67)
    tokens = 4096 * 2 * 64
    flops = (6 * L13.num_parameters() + 12 * 40 * 4096 * 5120) * tokens / (2 * 4)
    assert cost.compute_s == pytest.approx(flops / COMPUTE_FLOPS_PER_S)
    assert cost.samples_per_step == 2 * 64
    assert cost.step_s == pytest.approx(cost.compute_s / (1 - cost.bubble) + cost.exposed_comm_s)
    assert cost.dp_comm_s == 0.0
    # recompute repeats the forward: 4/3 of the compute
    slow = estimate_cost(L13, TrainSetup(recompute=True), lay)
    assert slow.compute_s == pytest.approx(cost.compute_s * 4 / 3)


# ---- the upstream 13b run --------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [False, True])
def test_13b_on_8x64gb_upstream_settings_tp8_fits(recompute):
    result = plan(L13, TrainSetup(recompute=recompute))
    tp8 = ParallelLayout(8, 1, 1, 1)  # upstream: tp 8, pp 1, --sharding_parallel_degree 1 --sharding stage1
    assert tp8 in _layouts(result.fitting)
    assert result.chosen is not None and result.chosen.layout == tp8
    assert any("shards nothing" in n for n in result.chosen.notes)
    assert all(c.layout.world == 8 for c in result.fitting + result.not_fitting + result.rejected)
    # recompute frees activations: more layouts fit, none fits only without it
    assert result.chosen.memory is not None
    assert result.chosen.memory.total_gb < (35 if recompute else 40)


def test_13b_recompute_fits_more_layouts():
    plain = plan(L13, TrainSetup(recompute=False))
    rec = plan(L13, TrainSetup(recompute=True))
    assert set(_layouts(plain.fitting)) < set(_layouts(rec.fitting))


def test_13b_tp1_pp1_without_sharding_does_not_fit_64gb():
    setup = TrainSetup(sequence_parallel=False, sharding_stage=0)
    mem = estimate_memory(L13, setup, ParallelLayout(1, 1, 1, 8))
    assert mem.params_gb + mem.grads_gb + mem.optimizer_gb == pytest.approx(13_015_864_320 * 18 / GB)
    assert mem.total_gb > 64 and not mem.fits
    with pytest.raises(PipelineError, match=r"tp 1, pp 1, sharding 1, dp 8 does not fit: it needs 2\d\d\.\d GB"):
        plan(L13, setup, {"tp": 1, "pp": 1, "sharding": 1, "dp": 8})
    with pytest.raises(PipelineError, match=r"57\.6 GB are usable.*optimizer"):
        plan(L13, setup, {"tp": 1, "pp": 1, "sharding": 1})


def test_nothing_fits_returns_no_choice_with_the_numbers():
    result = plan(L70, UPSTREAM)
    assert result.chosen is None and not result.fitting
    assert "nothing fits" in result.why and "needs" in result.why
    assert "chosen: none" in format_table(result)


# ---- impossible layouts --------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, setup, expected",
    [
        (ParallelLayout(8, 1, 1, 2), UPSTREAM, "= 16, but there are 8 cards"),
        (ParallelLayout(3, 1, 1, 1), TrainSetup(cards_per_node=3), "tp 3 does not divide num_attention_heads 40"),
        (ParallelLayout(16, 1, 1, 1), TrainSetup(nodes=2), "tp 16 does not divide num_attention_heads 40"),
        (ParallelLayout(8, 3, 1, 1), TrainSetup(nodes=3), "pp 3 does not divide num_hidden_layers 40"),
        (ParallelLayout(1, 1, 1, 8), UPSTREAM, "sequence parallel needs tp > 1"),
        (ParallelLayout(2, 1, 4, 1), TrainSetup(sharding_stage=0), "sharding 4 with sharding_stage 0"),
        (ParallelLayout(16, 1, 1, 1), TrainSetup(nodes=2), "tensor parallel must stay within a node: tp 16 > 8"),
    ],
)
def test_impossible_layouts_have_clear_reasons(layout, setup, expected):
    reasons = check_layout(L13, setup, layout)
    assert any(expected in r for r in reasons), reasons


def test_tp_straddling_nodes_is_rejected():
    shape = ModelShape(hidden_size=96, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=12,
                       vocab_size=1000, intermediate_size=256)
    reasons = check_layout(shape, TrainSetup(nodes=3), ParallelLayout(3, 1, 1, 8))
    assert reasons == ["tensor parallel must stay within a node: tp 3 does not divide 8 cards per node, "
                       "so some tp groups straddle two nodes"]


def test_upstream_layout_and_vocab_split_are_possible_with_notes():
    assert check_layout(L13, UPSTREAM, ParallelLayout(8, 1, 1, 1)) == []
    odd_vocab = ModelShape.from_dict({**KNOWN_MODELS["meta-llama/Llama-2-13b"], "vocab_size": 32001})
    assert check_layout(odd_vocab, UPSTREAM, ParallelLayout(8, 1, 1, 1)) == []
    notes = layout_notes(odd_vocab, UPSTREAM, ParallelLayout(8, 1, 1, 1))
    assert any("keeps embed_tokens and lm_head whole" in n for n in notes)
    # the whole vocabulary then sits on every tp rank: 2 x V x h more than 2 x V x h / 8
    diff = (estimate_memory(odd_vocab, UPSTREAM, ParallelLayout(8, 1, 1, 1)).params_per_card
            - estimate_memory(L13, UPSTREAM, ParallelLayout(8, 1, 1, 1)).params_per_card)
    assert diff == pytest.approx(2 * 32001 * 5120 - 2 * 32000 * 5120 / 8)


def test_gqa_kv_heads_must_divide_tp():
    assert check_layout(L70, UPSTREAM, ParallelLayout(8, 1, 1, 1)) == []
    reasons = check_layout(L70, TrainSetup(cards_per_node=16), ParallelLayout(16, 1, 1, 1))
    assert reasons == ["tp 16 does not divide num_key_value_heads 8"]


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hiden_size": 64}, "hiden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"intermediate_size": "128"}, "intermediate_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66}, "hidden_size"),
    ],
)
def test_bad_model_shape_names_the_field(change, field):
    with pytest.raises(PipelineError, match=field):
        ModelShape.from_dict({**TINY, **change})


def test_missing_model_field_is_named():
    data = dict(TINY)
    del data["vocab_size"]
    with pytest.raises(PipelineError, match="missing field.*vocab_size"):
        ModelShape.from_dict(data)


def test_tp_more_than_heads_is_named():
    with pytest.raises(PipelineError, match="tp 8 does not divide num_attention_heads 4"):
        plan(ModelShape.from_dict(TINY), UPSTREAM, {"tp": 8})


@pytest.mark.parametrize(
    "data, field",
    [({"sharding_stage": 4}, "sharding_stage"), ({"dtype": "int8"}, "dtype"), ({"nodes": 0}, "nodes"),
     ({"recompute": "yes"}, "recompute"), ({"tp_overlap": 1.5}, "tp_overlap"), ({"cards": 8}, "cards"),
     ({"memory_per_card_gb": 0}, "memory_per_card_gb")],
)
def test_bad_train_setup_names_the_field(data, field):
    with pytest.raises(PipelineError, match=field):
        TrainSetup.from_dict(data)


@pytest.mark.parametrize("fixed, text", [({"mp": 2}, "'mp'"), ({"tp": 0}, "tp must be >= 1"),
                                         ({"tp": 3}, "do not divide|does not divide")])
def test_bad_pins(fixed, text):
    with pytest.raises(PipelineError, match=text):
        plan(L13, UPSTREAM, fixed)


# ---- multi-node, output ----------------------------------------------------------------------


def test_two_nodes_plan_over_16_cards():
    setup = TrainSetup(nodes=2)
    result = plan(L13, setup)
    every = result.fitting + result.not_fitting + result.rejected
    assert every and all(c.layout.world == 16 for c in every)
    assert result.chosen is not None and result.chosen.layout.world == 16
    assert all(c.layout.tp <= 8 for c in result.fitting)
    tp16 = next(c for c in result.rejected if c.layout.tp == 16)
    assert any("within a node" in r for r in tp16.reasons)
    # topology (PaddleNLP pp_first): tp innermost, so tp 8 stays on a node and its sharding group spans two
    assert not group_spans_nodes(ParallelLayout(8, 1, 2, 1), ("tp",), 8)
    assert group_spans_nodes(ParallelLayout(8, 1, 2, 1), ("sharding",), 8)
    inter = estimate_cost(L13, setup, ParallelLayout(8, 1, 2, 1)).dp_comm_s
    assert inter > 0
    assert plan(L13, setup, {"tp": 8, "pp": 1, "sharding": 2}).chosen.layout == ParallelLayout(8, 1, 2, 1)


def test_table_and_json_are_deterministic():
    result = plan(L13, UPSTREAM, name="meta-llama/Llama-2-13b")
    table = format_table(result, top=3)
    assert table == format_table(plan(L13, UPSTREAM, name="meta-llama/Llama-2-13b"), top=3)
    assert "chosen: tp 8, pp 1, sharding 1, dp 1" in table
    rows = [ln for ln in table.splitlines() if re.match(r"\s*\*?\d+\s", ln)]
    marked = [r.split() for r in rows if r.split()[0].startswith("*")]
    assert len(rows) == 3 and len(marked) == 1 and marked[0][1:5] == ["8", "1", "1", "1"]  # chosen marked
    # the chosen layout is shown even when it ranks below the top rows
    two_nodes = format_table(plan(L13, TrainSetup(nodes=2)), top=1)
    marks = [ln.split()[0] for ln in two_nodes.splitlines() if re.match(r"\s*\*?\d+\s", ln)]
    assert marks[0] == "1" and len(marks) == 2 and marks[1].startswith("*")
    data = json.loads(to_json(result))
    assert data["model"]["name"] == "meta-llama/Llama-2-13b"
    assert data["chosen"]["tp"] == 8 and data["chosen"]["status"] == "fits"
    assert {c["status"] for c in data["rejected"]} == {"impossible"}
    assert all(c["reasons"] for c in data["rejected"])
    assert to_json(result) == to_json(plan(L13, UPSTREAM, name="meta-llama/Llama-2-13b"))


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_prints_table_and_writes_plan_json(capsys, tmp_path):
    out = tmp_path / "results" / "plan.json"
    assert plan_cli.main(["--model", "meta-llama/Llama-2-13b", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "total GB" in printed and "chosen: tp 8, pp 1, sharding 1, dp 1" in printed
    data = json.loads(out.read_text())
    by_hand = estimate_memory(L13, UPSTREAM, ParallelLayout(8, 1, 1, 1)).total_gb  # checked term by term above
    assert data["chosen"]["memory_gb"]["total_gb"] == pytest.approx(by_hand, abs=0.01)
    assert data["setup"]["seq_length"] == 4096 and data["cards"] == 8


def test_cli_multi_node_pins_and_hf_config(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    hf = {k: v for k, v in KNOWN_MODELS["meta-llama/Llama-2-13b"].items() if k != "num_key_value_heads"}
    cfg.write_text(json.dumps({**hf, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert plan_cli.main(["--model-config", str(cfg), "--nodes", "2", "--tp", "8", "--recompute"]) == 0
    printed = capsys.readouterr().out
    assert "2 node(s) x 8 = 16" in printed and "pinned: tp 8" in printed and "setup:" in printed


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--tp", "3"], "tp 3"),
        (["--model", "llama-3"], "is not known"),
        (["--model", "meta-llama/Llama-2-70b"], "nothing fits"),
        (["--tp", "1", "--pp", "1", "--sharding", "1", "--dp", "8", "--no-sequence-parallel"], "does not fit"),
        (["--grad-acc", "0"], "gradient_accumulation_steps"),
    ],
)
def test_cli_errors_are_one_line_exit_2(capsys, argv, text):
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_model_config_file(capsys, tmp_path):
    bad = tmp_path / "shape.json"
    bad.write_text(json.dumps({**TINY, "rope_theta": 10000}))
    assert plan_cli.main(["--model-config", str(bad)]) == 2
    assert "rope_theta" in capsys.readouterr().err
    assert plan_cli.main(["--model-config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_add_plan_parser_for_the_main_cli(capsys):
    parser = argparse.ArgumentParser(prog="llamapipe")
    sub = parser.add_subparsers(dest="stage", required=True)
    plan_cli.add_plan_parser(sub)
    args = parser.parse_args(["plan", "--nodes", "2", "--top", "2"])
    assert args.handler is plan_cli.run_plan
    summary = args.handler(args)
    assert summary["tp"] * summary["pp"] * summary["sharding"] * summary["dp"] == 16
    assert "chosen:" in capsys.readouterr().out


# ---- LoRA (issue 21) ---------------------------------------------------------------------------

LORA4 = TrainSetup(cards_per_node=4, lora=True, sharding_stage=0)  # llama_npu_lora_N1C8.sh on 4 cards: rank 32


def test_lora_adapter_parameters_by_hand():
    # rank r on q, k, v, o (h x h), gate, up (h x f), down (f x h): r*(d_in + d_out) each
    r, h, f = 32, 5120, 13824
    per_layer = r * ((h + h) * 4 + (h + f) * 3)  # 13b: kv width = h
    assert per_layer == 32 * 97_792 == 3_129_344
    assert sum(L13.lora_layer_parameters(32).values()) == per_layer
    assert L13.num_lora_parameters(32) == 40 * per_layer == 125_173_760
    # tp 4: column-parallel q, k, v, gate, up keep A (d_in x r) whole and split B; row-parallel o, down the reverse
    col = r * (h + h / 4) * 3 + r * (h + f / 4) * 2
    row = r * (h / 4 + h) + r * (f / 4 + h)
    assert sum(L13.lora_layer_parameters(32, tp=4).values()) == col + row == 1_642_496
    # GQA (70b): k and v are h x 1024
    assert L70.lora_layer_parameters(8)["attention"] == 8 * (2 * (8192 + 8192) + 2 * (8192 + 1024))


def test_lora_memory_13b_tp4_by_hand():
    mem = estimate_memory(L13, LORA4, ParallelLayout(4, 1, 1, 1))
    base = 40 * ((4 * 5120**2 + 3 * 5120 * 13824) / 4 + 2 * 5120) + 2 * 32000 * 5120 / 4 + 5120
    adapters = 40 * 1_642_496
    assert mem.params_per_card == pytest.approx(base + adapters)
    assert mem.trainable_per_card == pytest.approx(adapters)
    assert mem.params_gb == pytest.approx((base + adapters) * 2 / GB)  # frozen base in bf16, adapters bf16
    assert mem.grads_gb == pytest.approx(adapters * 4 / GB)  # amp_master_grad: fp32, adapters only
    assert mem.optimizer_gb == pytest.approx(adapters * 12 / GB)  # master weights + Adam moments, adapters only
    acts = 40 * 4096 * 2 * 5120 * 34 / 4 + 4 * 4096 * 2 * 32000 / 4  # as without LoRA
    assert mem.activations_gb == pytest.approx(acts / GB)
    assert mem.total_gb == pytest.approx(((base + adapters) * 2 + adapters * 16 + acts) / GB + FRAMEWORK_OVERHEAD_GB)
    assert mem.total_gb == pytest.approx(24.7, abs=0.05) and mem.fits
    full = estimate_memory(L13, TrainSetup(cards_per_node=4), ParallelLayout(4, 1, 1, 1))
    assert full.total_gb == pytest.approx(75.6, abs=0.05) and not full.fits  # what LoRA was refused with


def test_lora_frozen_base_costs_its_weight_bytes_only():
    fp32 = estimate_memory(L13, TrainSetup(cards_per_node=4, lora=True, sharding_stage=0, dtype="fp32",
                                           sequence_parallel=False), ParallelLayout(1, 1, 1, 4))
    adapters = L13.num_lora_parameters(32)
    assert fp32.params_gb == pytest.approx((L13.num_parameters() + adapters) * 4 / GB)
    assert fp32.grads_gb + fp32.optimizer_gb == pytest.approx(adapters * (4 + 8) / GB)  # fp32 Adam
    # ZeRO stage 3 over 4 shards the frozen weights too; stage 1 only the adapters' optimizer state
    s3 = estimate_memory(L13, TrainSetup(cards_per_node=4, lora=True, sharding_stage=3, sequence_parallel=False),
                         ParallelLayout(1, 1, 4, 1))
    assert s3.params_gb == pytest.approx((L13.num_parameters() + adapters) * 2 / 4 / GB)
    assert s3.optimizer_gb == pytest.approx(adapters * 12 / 4 / GB)


def test_lora_cost_skips_the_frozen_weight_gradients():
    lay = ParallelLayout(4, 1, 1, 1)
    n, n_lora, attn = L13.num_parameters(), L13.num_lora_parameters(32), 12 * 40 * 4096 * 5120
    tokens = 4096 * 2 * 64
    assert estimate_cost(L13, LORA4, lay).compute_s == pytest.approx(
        (4 * n + 6 * n_lora + attn) * tokens / 4 / COMPUTE_FLOPS_PER_S)
    rec = TrainSetup(cards_per_node=4, lora=True, sharding_stage=0, recompute=True)
    assert estimate_cost(L13, rec, lay).compute_s == pytest.approx(
        (6 * n + 8 * n_lora + attn * 4 / 3) * tokens / 4 / COMPUTE_FLOPS_PER_S)
    # data parallel syncs the adapters' gradients only: 2*(2-1)/2 x adapters per card x 4 bytes
    dp2 = estimate_cost(L13, LORA4, ParallelLayout(2, 1, 1, 2))
    adapters_tp2 = 40 * sum(L13.lora_layer_parameters(32, tp=2).values())
    assert dp2.dp_comm_s == pytest.approx(adapters_tp2 * 4 / 100e9)
    full = estimate_cost(L13, TrainSetup(cards_per_node=4), ParallelLayout(2, 1, 1, 2))
    base_tp2 = max(stage_parameters(L13, ParallelLayout(2, 1, 1, 2)).values())
    assert full.dp_comm_s / dp2.dp_comm_s == pytest.approx(base_tp2 / adapters_tp2)  # 76x fewer bytes


def test_lora_13b_on_4x64gb_fits_where_full_fine_tuning_does_not():
    full = plan(L13, TrainSetup(cards_per_node=4))
    assert full.chosen is None and "75.6 GB" in full.why
    lora = plan(L13, LORA4, prefer={"tp": 8, "pp": 1, "sharding": 1})
    assert lora.chosen is not None and lora.chosen.layout == ParallelLayout(4, 1, 1, 1)
    assert lora.chosen.memory.total_gb == pytest.approx(24.7, abs=0.05)
    assert lora.preferred_note == "does not fit the 4 cards (8 x 1 x 1 = 8 does not divide 4)"
    assert "LoRA rank 32 (base frozen)" in format_table(lora)
    assert all(c.layout.sharding == 1 for c in lora.fitting)  # stage 0: sharding > 1 shards nothing


def test_preferred_layout_wins_whenever_it_fits():
    assert plan(L13, UPSTREAM).chosen.layout == ParallelLayout(8, 1, 1, 1)
    other = plan(L13, UPSTREAM, prefer={"tp": 4, "pp": 1, "sharding": 2})  # fits (56.1 GB), not the choice
    assert other.chosen.layout == ParallelLayout(4, 1, 2, 1) and other.preferred_note == ""
    assert other.why.startswith("the preferred layout (tp 4, pp 1, sharding 2) fits")
    tiny = plan(L13, TrainSetup(memory_per_card_gb=40), prefer={"tp": 8, "pp": 1, "sharding": 1})
    assert tiny.preferred_note == "does not fit in memory: it needs 39.1 GB per card, 36.0 GB are usable"
    gqa = ModelShape.from_dict({**KNOWN_MODELS["meta-llama/Llama-2-7b"], "num_key_value_heads": 2})
    passed = plan(gqa, UPSTREAM, prefer={"tp": 8, "pp": 1, "sharding": 1})
    assert passed.preferred_note == "is impossible here: tp 8 does not divide num_key_value_heads 2"
    assert passed.why.startswith("the preferred tp 8, pp 1, sharding 1 is impossible here")
    assert json.loads(to_json(passed))["preferred"] == {"tp": 8, "pp": 1, "sharding": 1}


def test_cli_lora_options_and_plan_json(capsys, tmp_path):
    out = tmp_path / "plan.json"
    argv = ["--cards", "4", "--lora", "--lora-rank", "32", "--prefer", "8,1,1", "--expect-layout", "4,1,1",
            "--out", str(out)]
    assert plan_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "sharding stage 0" in printed and "LoRA rank 32" in printed
    data = json.loads(out.read_text())
    assert data["setup"]["lora"] is True and data["setup"]["sharding_stage"] == 0  # upstream's LoRA: no --sharding
    assert (data["chosen"]["tp"], data["chosen"]["pp"], data["chosen"]["sharding"]) == (4, 1, 1)
    assert data["run_layout"] == {"tp": 4, "pp": 1, "sharding": 1, "fits": True}
    assert "does not divide 4" in data["preferred_note"]
    assert plan_cli.main(["--cards", "4"]) == 2  # full fine-tuning: nothing fits, and --lora is offered
    assert "--lora" in capsys.readouterr().err
    args = plan_cli.parse_plan_args(["--lora", "--sharding-stage", "1"])
    assert plan_cli.plan_from_args(args).setup.sharding_stage == 1  # an explicit stage stands


# ---- config -> plan arguments (llamapipe.config.parallel) -------------------------------------


def _npu_cfg(tmp_path, monkeypatch, **over):
    import yaml

    from conftest import ROOT
    from llamapipe.config import deep_merge, load

    monkeypatch.chdir(ROOT)  # config.yaml's data.url is relative to the project
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()),
                                              {"target": "npu", **over})))
    return load(str(path))


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_plan_argv_passes_lora_whenever_sft_lora_is_on(tmp_path, monkeypatch):
    from llamapipe.config.parallel import plan_argv

    full = plan_argv(_npu_cfg(tmp_path, monkeypatch))
    assert "--lora" not in full and "--lora-rank" not in full and _value(full, "--sharding-stage") == "1"
    lora = plan_argv(_npu_cfg(tmp_path, monkeypatch, sft={"lora": True}))
    assert "--lora" in lora and _value(lora, "--lora-rank") == "32"  # npu.sft.lora_rank, the guide's
    assert _value(lora, "--sharding-stage") == "0"  # the LoRA command passes no --sharding (as upstream's script)
    rank8 = plan_argv(_npu_cfg(tmp_path, monkeypatch, sft={"lora": True}, npu={"sft": {"lora_rank": 8}}))
    assert _value(rank8, "--lora-rank") == "8"


def test_plan_argv_pins_a_mapping_and_prefers_the_guide_for_auto(tmp_path, monkeypatch):
    from llamapipe.config.parallel import plan_argv

    auto = _npu_cfg(tmp_path, monkeypatch, devices="0,1,2,3", sft={"lora": True})  # config.yaml: parallel auto
    assert auto["npu"]["parallel"]["tensor_parallel_degree"] == 4  # chosen at resolve
    rule = plan_argv(auto, pin=False)  # the plan rule of an `auto` run
    assert _value(rule, "--expect-layout") == "4,1,1" and _value(rule, "--prefer") == "8,1,1" and "--tp" not in rule
    pinned = plan_argv(_npu_cfg(tmp_path, monkeypatch, devices="0,1,2,3", sft={"lora": True},
                                npu={"parallel": {"tensor_parallel_degree": 2}}))
    assert pinned[-6:] == ["--tp", "2", "--pp", "1", "--sharding", "1"] and "--prefer" not in pinned
