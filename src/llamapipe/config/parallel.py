"""config.yaml (target npu) -> the parallel plan: check the layout before anything starts.

One mapping: the config becomes ``llamapipe plan`` arguments; config validation parses the same
arguments and plans in-process, and the ``plan`` rule runs the same command to write
results/plan.json. ``npu.parallel: auto`` takes the planner's choice.
"""

from __future__ import annotations

from typing import Any

from llamapipe.core.cards import parse_cards
from llamapipe.core.errors import PipelineError

SHARDING_STAGE = {"": 0, "stage1": 1, "stage2": 2, "stage3": 3}
AUTO_DEFAULTS = {  # what `parallel: auto` keeps fixed while the planner picks the degrees
    "sharding": "stage1",
    "sharding_parallel_config": "enable_stage1_tensor_fusion enable_stage1_overlap",
    "sequence_parallel": True,
    "recompute": False,
}
DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _flag(name: str, on: bool) -> str:
    return f"--{name}" if on else f"--no-{name}"


def plan_argv(cfg: dict, pin: bool = True) -> list[str]:
    npu, sft = cfg["npu"], cfg["sft"]
    par = npu["parallel"] if isinstance(npu["parallel"], dict) else AUTO_DEFAULTS
    model = (["--model-config", npu["model_config"]] if npu.get("model_config")
             else ["--model", npu["model_name_or_path"]])
    argv = model + [
        "--seq-length", str(sft["max_length"]),
        "--micro-batch", str(sft["per_device_train_batch_size"]),
        "--grad-acc", str(sft["gradient_accumulation_steps"]),
        "--cards", str(len(parse_cards(cfg["devices"]))),
        "--nodes", str(npu["nodes"]),
        "--memory-gb", str(npu["memory_per_card_gb"]),
        "--sharding-stage", str(SHARDING_STAGE[par["sharding"]]),
        "--dtype", DTYPE[sft["dtype"]],
        _flag("recompute", par["recompute"]),
        _flag("sequence-parallel", par["sequence_parallel"]),
        _flag("flash-attention", npu["fused"]["use_flash_attention"]),
        _flag("master-grad", npu["fused"]["amp_master_grad"]),
    ]
    if pin and isinstance(npu["parallel"], dict):
        argv += ["--tp", str(par["tensor_parallel_degree"]), "--pp", str(par["pipeline_parallel_degree"]),
                 "--sharding", str(par["sharding_parallel_degree"])]
    elif isinstance(npu["parallel"], dict):  # `auto`, already chosen: the plan rule checks it still fits
        argv += ["--expect-layout", ",".join(str(par[k]) for k in (
            "tensor_parallel_degree", "pipeline_parallel_degree", "sharding_parallel_degree"))]
    return argv


def apply_plan(cfg: dict) -> Any:
    """Check the configured layout (or choose one for ``auto``); returns the plan."""
    from llamapipe.scaleout.plan_cli import parse_plan_args, plan_from_args
    from llamapipe.scaleout.planner import format_table

    auto = not isinstance(cfg["npu"]["parallel"], dict)
    result = plan_from_args(parse_plan_args(plan_argv(cfg, pin=not auto)))
    if result.chosen is None:
        raise PipelineError(f"npu.parallel: {result.why}\n{format_table(result, top=5)}")
    if auto:
        layout = result.chosen.layout
        cfg["npu"]["parallel"] = dict(AUTO_DEFAULTS, tensor_parallel_degree=layout.tp,
                                      pipeline_parallel_degree=layout.pp, sharding_parallel_degree=layout.sharding)
    return result
