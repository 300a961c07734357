"""config.yaml (target npu) -> the parallel plan: check the layout before anything starts.

One mapping: the config becomes ``llamapipe plan`` arguments; config validation parses the same
arguments and plans in-process, and the ``plan`` rule runs the same command to write
results/plan.json.

``npu.parallel: auto`` (config.yaml's default) is the guide's layout, :data:`GUIDE_DEGREES` with
:data:`AUTO_DEFAULTS`, whenever it fits the cards; otherwise the planner's choice, said on the
terminal in one line and recorded in results/plan.json (``preferred_note``, ``chosen``,
``run_layout``). A mapping pins a layout: it runs as given or is refused, and the refusal names
an override that fits (:func:`layout_fixes`). So "default" and "pinned" need no comparison with
config.yaml: a mapping is the user's, whatever its values.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from llamapipe.config.paths import model_config_file
from llamapipe.core.cards import parse_cards
from llamapipe.core.errors import PipelineError

SHARDING_STAGE = {"": 0, "stage1": 1, "stage2": 2, "stage3": 3}
AUTO_DEFAULTS = {  # what `parallel: auto` keeps fixed while the planner picks the degrees (the guide's)
    "sharding": "stage1",
    "sharding_parallel_config": "enable_stage1_tensor_fusion enable_stage1_overlap",
    "sequence_parallel": True,
    "recompute": False,
}
GUIDE_DEGREES = {"tensor_parallel_degree": 8, "pipeline_parallel_degree": 1, "sharding_parallel_degree": 1}
"""llama_npu_sft_N1C8.sh's and llama_npu_lora_N1C8.sh's degrees: what ``auto`` takes whenever they fit."""
DEGREE_KEYS = tuple(GUIDE_DEGREES)
DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _flag(name: str, on: bool) -> str:
    return f"--{name}" if on else f"--no-{name}"


def _degrees_csv(degrees: dict) -> str:
    return ",".join(str(degrees[k]) for k in DEGREE_KEYS)


def plan_argv(cfg: dict, pin: bool = True) -> list[str]:
    """``llamapipe plan`` arguments for the config. ``npu.parallel`` a mapping: with ``pin`` its
    degrees (``--tp --pp --sharding``); without, the layout ``auto`` chose at parse time, which the
    plan rule checks still fits (``--expect-layout``, with the guide's ``--prefer``). ``auto`` not
    chosen yet: the whole search, preferring the guide's degrees."""
    par = cfg["npu"]["parallel"]
    argv = _setting_argv(cfg, par if isinstance(par, dict) else AUTO_DEFAULTS)
    if pin and isinstance(par, dict):
        return argv + ["--tp", str(par["tensor_parallel_degree"]), "--pp", str(par["pipeline_parallel_degree"]),
                       "--sharding", str(par["sharding_parallel_degree"])]
    if isinstance(par, dict):  # `auto`, already chosen: the plan rule checks it still fits
        argv += ["--expect-layout", _degrees_csv(par)]
    return argv + ["--prefer", _degrees_csv(GUIDE_DEGREES)]


def _setting_argv(cfg: dict, par: dict) -> list[str]:
    """Everything but the degrees: model, sizes, cards, memory, LoRA and ``par``'s options.
    LoRA runs without ``--sharding`` (npu.upstream_args, as upstream's LoRA script): stage 0."""
    npu, sft = cfg["npu"], cfg["sft"]
    # npu.model_config, or a local model directory's config.json: the planner reads the shape there
    shape = model_config_file(cfg)
    model = ["--model-config", shape] if shape else ["--model", npu["model_name_or_path"]]
    argv = model + [
        "--seq-length", str(sft["max_length"]),
        "--micro-batch", str(sft["per_device_train_batch_size"]),
        "--grad-acc", str(sft["gradient_accumulation_steps"]),
        "--cards", str(len(parse_cards(cfg["devices"]))),
        "--nodes", str(npu["nodes"]),
        "--memory-gb", str(npu["memory_per_card_gb"]),
        "--sharding-stage", str(0 if sft["lora"] else SHARDING_STAGE[par["sharding"]]),
        "--dtype", DTYPE[sft["dtype"]],
        _flag("recompute", par["recompute"]),
        _flag("sequence-parallel", par["sequence_parallel"]),
        _flag("flash-attention", npu["fused"]["use_flash_attention"]),
        _flag("master-grad", npu["fused"]["amp_master_grad"]),
    ]
    if sft["lora"]:
        argv += ["--lora", "--lora-rank", str(sft["lora_rank"])]
    return argv


def apply_plan(cfg: dict) -> Any:
    """Check the configured layout (or choose one for ``auto``); returns the plan.

    ``auto``: the guide's degrees when they fit, else the planner's choice, said in one line on
    stderr. Nothing fits, or a pinned layout does not: :class:`PipelineError` with the overrides
    that fit (:func:`layout_fixes`)."""
    from llamapipe.scaleout.planner import format_table

    auto = not isinstance(cfg["npu"]["parallel"], dict)
    try:
        result = _plan(plan_argv(cfg, pin=not auto))
    except PipelineError as err:  # a pinned layout that cannot run or fit
        raise PipelineError(f"npu.parallel: {err}{fix_lines(cfg)}") from None
    if result.chosen is None:
        sft, cards = cfg["sft"], result.setup.total_cards
        what = f"LoRA rank {sft['lora_rank']}" if sft["lora"] else "full fine-tuning (sft.lora false)"
        raise PipelineError(f"npu.parallel: {what} of {result.name} on {cards} cards: {result.why}"
                            f"{fix_lines(cfg)}\n{format_table(result, top=5)}")
    if auto:
        layout = result.chosen.layout
        cfg["npu"]["parallel"] = dict(AUTO_DEFAULTS, tensor_parallel_degree=layout.tp,
                                      pipeline_parallel_degree=layout.pp, sharding_parallel_degree=layout.sharding)
        if result.preferred_note:
            print(f"npu.parallel: {_label(result.preferred)} {result.preferred_note}; using the planner's choice "
                  f"{_choice_label(result.chosen)} (set npu.parallel to pin a layout)", file=sys.stderr)
    return result


def _plan(argv: list[str]) -> Any:
    from llamapipe.scaleout.plan_cli import parse_plan_args, plan_from_args

    return plan_from_args(parse_plan_args(argv))


def _label(degrees: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in degrees.items())


def _choice_label(candidate: Any) -> str:
    return f"{candidate.layout.label()}, {candidate.memory.total_gb:.1f} GB per card"


def _chosen(cfg: dict, options: dict) -> Any:
    """The layout ``auto`` would run with ``options`` (the guide's degrees when they fit); None when
    nothing fits."""
    try:
        return _plan(_setting_argv(cfg, options) + ["--prefer", _degrees_csv(GUIDE_DEGREES)]).chosen
    except PipelineError:
        return None


def _flow(value: Any) -> str:
    """A value in YAML flow style, as ``--config 'key=...'`` takes it inside single quotes."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not value.replace("_", "").isalnum():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def config_override(over: dict) -> str:
    """``--config 'key={...}' ...``: the command-line form of top-level config keys (the same
    mapping under those keys in a config file does the same)."""
    return "--config " + " ".join(f"'{key}={_flow(value)}'" for key, value in over.items())


def _pinned_parallel(par: dict, layout: Any) -> dict:
    """npu.parallel pinned to ``layout``'s degrees, with ``par``'s options where they are not auto's."""
    degrees = {"tensor_parallel_degree": layout.tp, "pipeline_parallel_degree": layout.pp,
               "sharding_parallel_degree": layout.sharding}
    return {**degrees, **{k: v for k, v in par.items() if k in AUTO_DEFAULTS and v != AUTO_DEFAULTS[k]}}


def layout_fixes(cfg: dict) -> list[str]:
    """Overrides that make the npu run fit the cards, each checked by planning it:

    * ``npu.parallel`` pinned: the planner's choice of degrees with the pinned mapping's other
      settings, pinned (``npu={parallel: {tensor_parallel_degree: ...}}``), and ``auto``;
    * when none of those fits and sft trains every weight: LoRA (``sft={lora: true}``, with
      ``auto``), which needs no gradients or optimizer state for the base.

    Empty: nothing tried fits (more cards, or a smaller model or sequence)."""
    par, cards = cfg["npu"]["parallel"], len(parse_cards(cfg["devices"])) * cfg["npu"]["nodes"]
    fixes = []
    if isinstance(par, dict):
        own = _chosen(cfg, par)
        if own is not None:
            fixes.append(f"pin the planner's choice for the {cards} cards ({_choice_label(own)}): "
                         + config_override({"npu": {"parallel": _pinned_parallel(par, own.layout)}}))
        auto = _chosen(cfg, AUTO_DEFAULTS)
        if auto is not None:
            fixes.append(f"or let the planner choose at every run ({_choice_label(auto)} now): "
                         + config_override({"npu": {"parallel": "auto"}}))
    if not fixes and not cfg["sft"]["lora"]:
        lora = copy.deepcopy(cfg)
        lora["sft"]["lora"] = True
        chosen = _chosen(lora, AUTO_DEFAULTS)
        if chosen is not None:
            # npu.sft overlays sft: a lora key there wins over sft.lora
            over: dict = ({"npu": {"sft": {"lora": True}}} if "lora" in (cfg["npu"].get("sft") or {})
                          else {"sft": {"lora": True}})
            if isinstance(par, dict):
                over.setdefault("npu", {})["parallel"] = "auto"
            fixes.append(f"LoRA fits ({_choice_label(chosen)}; the base frozen, no gradients or optimizer "
                         f"state for it): " + config_override(over))
    return fixes


def fix_lines(cfg: dict) -> str:
    """The ``fix: ...`` lines of a refusal (:func:`layout_fixes`), or what is left to try."""
    fixes = layout_fixes(cfg)
    if not fixes:
        tried = "other degrees, auto" if isinstance(cfg["npu"]["parallel"], dict) else "the planner's layouts"
        tried += "" if cfg["sft"]["lora"] else ", LoRA"
        return (f"\nfix: nothing tried ({tried}) fits these cards: more cards (devices, npu.nodes), or a "
                f"smaller sft.max_length / per_device_train_batch_size")
    return "".join(f"\nfix: {line}" for line in fixes) + (
        "\n(add those KEY=VALUE words to your own --config list, since a second --config replaces the first; "
        "or set the same keys in a config file)")
