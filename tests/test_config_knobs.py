"""Every config knob reaches what it controls: each test fails if its key is ignored.

In-process (no Snakemake, no training): the config -> arguments/spec mappings, with a changed
value that differs from the default, so a code path that ignores the key cannot pass.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT
from llamapipe.config import load
from llamapipe.npu import scripts, upstream_args
from llamapipe.runners import commands
from llamapipe.scaleout import launch

PATHS = {"data": "results/data", "sft": "results/sft", "sft_checkpoints": "results/checkpoints/sft",
         "sft_launch_logs": "results/logs/sft_launch", "base_model": "results/model/base",
         "pretrain_data_cache": "results/cache/pretrain_data", "merged": "results/merged",
         "inference": "results/inference", "predictions": "results/predictions.json",
         "dev": "results/data/dev.json", "wheels": "results/wheels"}


def _cfg(tmp_path, **over) -> dict:
    """config.yaml with nested overrides (``{"sft": {"seed": 1}}``), validated and resolved."""
    import yaml

    from llamapipe.config import deep_merge

    raw = deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), over)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(str(path))


def _opts(argv: list[str]) -> dict:
    out, i = {}, 0
    while i < len(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if nxt is not None and not nxt.startswith("--"):
            out[argv[i]] = nxt
            i += 2
        else:
            out[argv[i]] = None
            i += 1
    return out


@pytest.mark.parametrize("key, value, flag, expected", [
    ("per_device_train_batch_size", 3, "--per_device_train_batch_size", "3"),
    ("gradient_accumulation_steps", 7, "--gradient_accumulation_steps", "7"),
    ("max_steps", 123, "--max_steps", "123"),
    ("learning_rate", 1.5e-5, "--learning_rate", "1.5e-05"),
    ("warmup_steps", 9, "--warmup_steps", "9"),
    ("save_steps", 11, "--save_steps", "11"),
    ("save_total_limit", 4, "--save_total_limit", "4"),
    ("logging_steps", 5, "--logging_steps", "5"),
    ("src_length", 512, "--src_length", "512"),
    ("max_length", 2048, "--max_length", "2048"),
    ("lora_rank", 16, "--lora_rank", "16"),
    ("dtype", "float16", "--fp16", "true"),
])
def test_npu_sft_knobs_reach_run_finetune(tmp_path, key, value, flag, expected):
    cfg = _cfg(tmp_path, target="npu", npu={"sft": {key: value, "lora": key == "lora_rank"}})
    args = _opts(upstream_args.finetune_args(cfg, "m", "d", "o"))
    assert args[flag] == expected


def test_seed_reaches_every_training_entry_point(tmp_path):
    from llamapipe.stages.sft import training_arguments

    cfg = _cfg(tmp_path, target="npu", seed=7)
    assert _opts(upstream_args.finetune_args(cfg, "m", "d", "o"))["--seed"] == "7"
    assert _opts(upstream_args.pretrain_args(cfg, "m", "i", "o", "c"))["--seed"] == "7"
    assert training_arguments(cfg["sft"], "ckpt", seed=7)["seed"] == 7


@pytest.mark.parametrize("key, value, field", [
    ("gradient_accumulation_steps", 3, "gradient_accumulation_steps"),
    ("warmup_steps", 17, "warmup_steps"),
    ("weight_decay", 0.05, "weight_decay"),
    ("learning_rate", 2e-4, "learning_rate"),
    ("per_device_train_batch_size", 5, "per_device_train_batch_size"),
    ("max_steps", 177, "max_steps"),  # above save_steps (100): else no checkpoint, refused
    ("save_steps", 13, "save_steps"),
    ("save_total_limit", 3, "save_total_limit"),
    ("logging_steps", 4, "logging_steps"),
])
def test_cpu_sft_knobs_reach_the_trainer(tmp_path, key, value, field):
    from llamapipe.stages.sft import training_arguments

    cfg = _cfg(tmp_path, sft={key: value})
    assert training_arguments(cfg["sft"], "ckpt", seed=1)[field] == value


@pytest.mark.parametrize("key, value, field", [
    ("shm_size", "3g", "shm_size"), ("privileged", True, "privileged"), ("network", "host", "network"),
    ("image", "other:tag", "image"),
])
def test_container_knobs_reach_the_cpu_container_spec(tmp_path, key, value, field):
    cfg = _cfg(tmp_path, runtime="container", container={key: value})
    assert commands.container_spec("sft", cfg, str(tmp_path))[field] == value


@pytest.mark.parametrize("key, value, field", [
    ("shm_size", "64g", "shm_size"), ("privileged", True, "privileged"), ("network", "bridge", "network"),
])
def test_npu_container_knobs_reach_the_npu_container_spec(tmp_path, key, value, field):
    cfg = _cfg(tmp_path, target="npu", npu={key: value})
    assert commands.container_spec("sft", cfg, str(tmp_path))[field] == value


def test_threads_reach_the_stage_process(tmp_path, monkeypatch):
    from llamapipe.core.paddle_env import prepare

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    prepare(3)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"
    cfg = _cfg(tmp_path, runtime="container")
    assert commands.container_spec("sft", cfg, str(tmp_path), threads=3)["env"]["OMP_NUM_THREADS"] == "3"


def test_model_shape_reaches_the_base_model_config(tmp_path):
    """init_model builds the configured shape (and merge keeps it: the guide's fix-up only adds)."""
    from llamapipe.core.checkpoint_io import fix_config
    from llamapipe.stages import init_model

    train = tmp_path / "train.json"
    train.write_text("".join(json.dumps({"src": f"类型#裙*颜色#{c}", "tgt": f"{c}色连衣裙，清新甜美。"},
                                        ensure_ascii=False) + "\n" for c in "红黄蓝绿白黑灰紫" * 8))
    shape = {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 96}
    init_model.run(shape, str(train), str(tmp_path / "base"), seed=3)
    config = json.loads((tmp_path / "base/config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        assert config[key] == shape[key], key
    assert config["vocab_size"] <= shape["vocab_size"]
    fixed = fix_config(config, "float16")
    assert {k: fixed[k] for k in shape if k != "vocab_size"} == {k: config[k] for k in shape if k != "vocab_size"}
    assert (fixed["dtype"], fixed["use_cache"], fixed["pad_token_id"]) == ("float16", False, 0)


def test_npu_base_model_is_named_not_built(tmp_path):
    from llamapipe.stages import init_model

    init_model.run({"model_name_or_path": "meta-llama/Llama-2-13b"}, "unused", str(tmp_path / "base"), seed=1)
    assert json.loads((tmp_path / "base/base_model.json").read_text())["model_name_or_path"] == "meta-llama/Llama-2-13b"


@pytest.mark.parametrize("dtype, bf16, fp16", [("bfloat16", "true", "false"), ("float16", "false", "true"),
                                               ("float32", "false", "false")])
def test_dtype_picks_exactly_one_amp_flag_on_both_training_scripts(tmp_path, dtype, bf16, fp16):
    cfg = _cfg(tmp_path, target="npu", npu={"sft": {"dtype": dtype}})
    for args in (upstream_args.finetune_args(cfg, "m", "d", "o"), upstream_args.pretrain_args(cfg, "m", "i", "o", "c")):
        opts = _opts(args)
        assert (opts["--bf16"], opts["--fp16"]) == (bf16, fp16)


def test_launcher_follows_the_device_whatever_string_object_carries_it(tmp_path):
    """`npu.device: cpu` from any YAML (not the interned literal the rehearsal sets) picks the
    CPU launcher form; npu keeps the card list."""
    cfg = _cfg(tmp_path, target="npu")
    assert launch.launch_argv(launch.npu_layout(cfg), ["s.py"], "logs")[4:6] == ["--devices", "0,1,2,3,4,5,6,7"]
    cfg["npu"]["device"] = "".join(["c", "pu"])
    assert launch.launch_argv(launch.npu_layout(cfg), ["s.py"], "logs")[4:6] == ["--nproc_per_node", "8"]


def test_smoke_knobs_reach_the_collective_check(tmp_path):
    """npu.smoke_timeout_s is the supervisor's --timeout; npu.smoke_devices (the rehearsal's,
    npu.device cpu) sets its ranks and the launcher's processes, not sft's."""
    paths = {**PATHS, "smoke_collective": "results/smoke_collective.json",
             "smoke_launch_logs": "results/logs/smoke_collective_launch"}
    cfg = _cfg(tmp_path, target="npu", npu={"smoke_timeout_s": 42, "device": "cpu", "smoke_devices": "0,1,2"})
    step = scripts.smoke_collective_script(cfg, paths, "/p", launch.npu_layout(cfg))[-1].split("; ")[-1].split()
    check, launcher = step[:step.index("--")], step[step.index("--") + 1:]
    assert (_opts(check[3:])["--timeout"], _opts(check[3:])["--cards"]) == ("42", "0,1,2")
    assert _opts(launcher[4:-3])["--nproc_per_node"] == "3"
    assert launch.launch_argv(launch.npu_layout(cfg), ["s.py"], "logs")[4:6] == ["--nproc_per_node", "8"]  # sft's
