"""Argument lists for PaddleNLP's own ``llm/`` entry points on the NPU target.

The NPU inference model, its weight re-layout and the custom-device passes live upstream, so
the NPU stages drive ``run_finetune.py`` / ``run_pretrain.py``, ``predict/export_model.py``
and ``predict/predictor.py`` from the pinned checkout in the image, with argument names exactly
as in ``llm/devices/npu/llama/*_N1C8.sh``, built from the same config knobs the cpu stages read.
Run from ``<checkout>/llm``: upstream export imports ``npu.llama.export_utils`` relatively.
"""

from __future__ import annotations

from typing import Any

ASCEND_ENV_SCRIPTS = ("ascend-toolkit/set_env.sh",)
# export/predict also source ATB's (export_npu.sh, predict_npu.sh: atb/); CANN 8.0.0 images ship
# it under nnal/atb/: the first that exists is sourced.
ATB_ENV_SCRIPTS = ("atb/set_env.sh", "nnal/atb/set_env.sh")


def _flag(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _args(pairs: list) -> list[str]:
    out: list[str] = []
    for name, value in pairs:
        out += [f"--{name}", _flag(value)]
    return out


def launch_argv(cfg: dict, script: str, log_dir: str) -> list[str]:
    """``python -u -m paddle.distributed.launch`` over the visible cards (and nodes)."""
    npu = cfg["npu"]
    argv = ["python", "-u", "-m", "paddle.distributed.launch"]
    if npu["device"] == "cpu":  # a CPU build has no device labels: --devices raises ValueError
        argv += ["--nproc_per_node", str(len(cfg["devices"].split(",")))]
    else:
        argv += ["--devices", cfg["devices"]]
    argv += ["--log_dir", log_dir]
    if npu["nodes"] > 1:
        argv += ["--nnodes", str(npu["nodes"])]
        if npu.get("master"):
            argv += ["--master", npu["master"]]
        if npu.get("ips"):
            argv += ["--ips", npu["ips"]]
    return argv + [script]


def finetune_args(cfg: dict, model: str, data_dir: str, output_dir: str) -> list[str]:
    """run_finetune.py arguments: llama_npu_sft_N1C8.sh (LoRA: llama_npu_lora_N1C8.sh)."""
    sft, npu = cfg["sft"], cfg["npu"]
    par, fused = npu["parallel"], npu["fused"]
    pairs = [
        ("device", npu["device"]),
        ("model_name_or_path", model),
        ("dataset_name_or_path", data_dir),
        ("output_dir", output_dir),
        ("per_device_train_batch_size", sft["per_device_train_batch_size"]),
        ("gradient_accumulation_steps", sft["gradient_accumulation_steps"]),
        ("per_device_eval_batch_size", 1),
        ("eval_accumulation_steps", 1),
        ("max_steps", sft["max_steps"]),
        ("learning_rate", sft["learning_rate"]),
        ("warmup_steps", sft["warmup_steps"]),
        ("save_steps", sft["save_steps"]),
        ("save_total_limit", sft["save_total_limit"]),
        ("logging_steps", sft["logging_steps"]),
        ("seed", cfg["seed"]),
        ("evaluation_strategy", "no"),
        ("src_length", sft["src_length"]),
        ("max_length", sft["max_length"]),
        ("bf16", sft["dtype"] == "bfloat16"),
        ("fp16", sft["dtype"] == "float16"),
        ("fp16_opt_level", fused["fp16_opt_level"]),
        ("do_train", True),
        ("tensor_parallel_output", fused["tensor_parallel_output"]),
        ("disable_tqdm", True),
        ("eval_with_do_generation", False),
        ("recompute", par["recompute"]),
        ("tensor_parallel_degree", par["tensor_parallel_degree"]),
        ("pipeline_parallel_degree", par["pipeline_parallel_degree"]),
        ("sharding_parallel_degree", par["sharding_parallel_degree"]),
        ("zero_padding", fused["zero_padding"]),
        ("amp_master_grad", fused["amp_master_grad"]),
        ("fuse_attention_qkv", fused["fuse_attention_qkv"]),
        ("fuse_attention_ffn", fused["fuse_attention_ffn"]),
        ("sequence_parallel", par["sequence_parallel"]),
        ("use_flash_attention", fused["use_flash_attention"]),
        ("use_fused_rope", fused["use_fused_rope"]),
        ("use_fused_rms_norm", fused["use_fused_rms_norm"]),
        ("pad_to_multiple_of", fused["pad_to_multiple_of"]),
        ("report_to", npu["report_to"]),
    ]
    if sft["lora"]:  # no --lora_alpha: run_finetune.py has none (alpha = 2 x rank)
        pairs += [("lora", True), ("lora_rank", sft["lora_rank"])]
    elif par["sharding"]:  # the LoRA script runs without sharding
        pairs += [("sharding", par["sharding"]), ("sharding_parallel_config", par["sharding_parallel_config"])]
    return _args(pairs)


def pretrain_args(cfg: dict, model: str, input_dir: str, output_dir: str) -> list[str]:
    """run_pretrain.py arguments: llama_npu_ppt_N1C8.sh."""
    sft, npu = cfg["sft"], cfg["npu"]
    par, fused, ppt = npu["parallel"], npu["fused"], npu["pretrain"]
    return _args([
        ("device", npu["device"]),
        ("model_name_or_path", model),
        ("tokenizer_name_or_path", model),
        ("input_dir", input_dir),
        ("output_dir", output_dir),
        ("split", ppt["split"]),
        ("max_seq_length", sft["max_length"]),
        ("per_device_train_batch_size", sft["per_device_train_batch_size"]),
        ("gradient_accumulation_steps", sft["gradient_accumulation_steps"]),
        ("learning_rate", sft["learning_rate"]),
        ("max_steps", sft["max_steps"]),
        ("save_steps", sft["save_steps"]),
        ("warmup_steps", sft["warmup_steps"]),
        ("logging_steps", sft["logging_steps"]),
        ("seed", cfg["seed"]),
        ("do_train", True),
        ("disable_tqdm", True),
        ("bf16", sft["dtype"] == "bfloat16"),
        ("fp16_opt_level", fused["fp16_opt_level"]),
        ("amp_master_grad", fused["amp_master_grad"]),
        ("use_flash_attention", fused["use_flash_attention"]),
        ("use_fused_rms_norm", fused["use_fused_rms_norm"]),
        ("use_fused_rope", fused["use_fused_rope"]),
        ("fuse_attention_qkv", fused["fuse_attention_qkv"]),
        ("fuse_attention_ffn", fused["fuse_attention_ffn"]),
        ("tensor_parallel_degree", par["tensor_parallel_degree"]),
        ("pipeline_parallel_degree", par["pipeline_parallel_degree"]),
        ("sharding_parallel_degree", par["sharding_parallel_degree"]),
        ("sharding", par["sharding"]),
        ("sequence_parallel", par["sequence_parallel"]),
        ("unified_checkpoint", True),
        ("report_to", npu["report_to"]),
    ])


def _inference_flags(cfg: dict) -> list[str]:
    return ["--inference_model", "--block_attn"] if cfg["npu"]["inference_model"] else []


def export_args(cfg: dict, model_dir: str, output_path: str) -> list[str]:
    """predict/export_model.py: export_npu.sh plus the lengths predict will use."""
    return _args([
        ("model_name_or_path", model_dir),
        ("output_path", output_path),
        ("dtype", cfg["export"]["dtype"]),
        ("device", cfg["npu"]["device"]),
        ("src_length", cfg["sft"]["src_length"]),
        ("max_length", cfg["export"]["max_new_tokens"]),
    ]) + _inference_flags(cfg)


def merge_lora_args(cfg: dict, base_model: str, lora_dir: str, output_path: str) -> list[str]:
    """tools/merge_lora_params.py: LoRA weights folded into the base (pdparams, not safetensors)."""
    return _args([
        ("model_name_or_path", base_model),
        ("lora_path", lora_dir),
        ("output_path", output_path),
        ("device", cfg["npu"]["device"]),
        ("safe_serialization", False),
    ])


def predictor_args(cfg: dict, model_dir: str, data_file: str, output_file: str) -> list[str]:
    """predict/predictor.py: predict_npu.sh in static mode over the dev prompts, greedy."""
    return _args([
        ("model_name_or_path", model_dir),
        ("dtype", cfg["export"]["dtype"]),
        ("mode", "static"),
        ("device", cfg["npu"]["device"]),
        ("data_file", data_file),
        ("output_file", output_file),
        ("batch_size", cfg["predict"]["batch_size"]),
        ("src_length", cfg["sft"]["src_length"]),
        ("max_length", cfg["predict"]["max_new_tokens"]),
        ("decode_strategy", "greedy_search"),
    ]) + _inference_flags(cfg)
