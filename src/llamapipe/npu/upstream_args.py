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
        if value is not None:  # None: not passed, upstream's default
            out += [f"--{name}", _flag(value)]
    return out


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


# llama_npu_ppt_N1C8.sh's settings that no config knob carries: passed as the script has them.
PRETRAIN_FIXED = (
    ("per_device_eval_batch_size", 1),
    ("virtual_pp_degree", 1),
    ("min_learning_rate", "0.000001"),
    ("max_grad_norm", "1.0"),
    ("dataloader_num_workers", 1),
    ("eval_steps", 1001),
    ("continue_training", 0),
    ("enable_linear_fused_grad_add", False),
    ("recompute_use_reentrant", True),
    ("load_sharded_model", True),
    ("save_sharded_model", True),
    ("ignore_data_skip", 0),
    ("force_reshard_pp", True),
    ("tensor_parallel_config", "enable_mp_async_allreduce enable_mp_skip_c_identity"),
    ("pipeline_parallel_config", "disable_partial_send_recv"),
)


def pretrain_args(cfg: dict, model: str, input_dir: str, output_dir: str, data_cache: str) -> list[str]:
    """run_pretrain.py arguments: llama_npu_ppt_N1C8.sh (sizes, degrees and fused ops from config)."""
    sft, npu = cfg["sft"], cfg["npu"]
    par, fused, ppt = npu["parallel"], npu["fused"], npu["pretrain"]
    return _args([
        ("model_name_or_path", model),
        ("tokenizer_name_or_path", model),
        ("input_dir", input_dir),
        ("output_dir", output_dir),
        ("split", ppt["split"]),
        ("max_seq_length", sft["max_length"]),
        ("per_device_train_batch_size", sft["per_device_train_batch_size"]),
        ("gradient_accumulation_steps", sft["gradient_accumulation_steps"]),
        ("use_flash_attention", fused["use_flash_attention"]),
        ("use_fused_rms_norm", fused["use_fused_rms_norm"]),
        ("learning_rate", sft["learning_rate"]),
        ("max_steps", sft["max_steps"]),
        ("save_steps", sft["save_steps"]),
        ("save_total_limit", sft["save_total_limit"]),
        ("seed", cfg["seed"]),
        ("warmup_steps", sft["warmup_steps"]),
        ("logging_steps", sft["logging_steps"]),
        ("tensor_parallel_degree", par["tensor_parallel_degree"]),
        ("disable_tqdm", True),
        ("do_train", True),
        ("device", npu["device"]),
        ("fuse_attention_qkv", fused["fuse_attention_qkv"]),
        ("fuse_attention_ffn", fused["fuse_attention_ffn"]),
        ("use_fused_rope", fused["use_fused_rope"]),
        ("data_cache", data_cache),
        ("bf16", sft["dtype"] == "bfloat16"),
        ("fp16", sft["dtype"] == "float16"),
        ("fp16_opt_level", fused["fp16_opt_level"]),
        ("amp_master_grad", fused["amp_master_grad"]),
        ("pipeline_parallel_degree", par["pipeline_parallel_degree"]),
        ("unified_checkpoint", True),
        ("sequence_parallel", par["sequence_parallel"]),
        ("sharding", par["sharding"]),
        ("sharding_parallel_degree", par["sharding_parallel_degree"]),
        ("recompute", par["recompute"]),
        ("report_to", npu["report_to"]),
        *PRETRAIN_FIXED,
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
    return _predictor_args(cfg, model_dir, data_file, output_file)


def serving_predictor_args(cfg: dict, model_dir: str) -> list[str]:
    """What ``llamapipe serve`` gives upstream's predictor (``PredictorArgument``/``ModelArgument``,
    parsed by ``llamapipe.serving.upstream_engine``): the predict rule's flags, in its order, without
    ``--data_file``/``--output_file`` (the prompts come from requests)."""
    return _predictor_args(cfg, model_dir, None, None)


def _predictor_args(cfg: dict, model_dir: str, data_file: str | None, output_file: str | None) -> list[str]:
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
