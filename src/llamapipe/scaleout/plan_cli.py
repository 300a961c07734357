"""``plan``: print the parallel-strategy table for a LLaMA on Ascend cards, optionally write plan.json.

    python -m llamapipe.scaleout.plan_cli --model meta-llama/Llama-2-13b --out results/plan.json
    python -m llamapipe.scaleout.plan_cli --model-config config.json --nodes 2 --tp 8
    python -m llamapipe.scaleout.plan_cli --cards 4 --lora --lora-rank 32

Defaults are upstream's ``llama_npu_sft_N1C8.sh`` (see :class:`llamapipe.scaleout.planner.TrainSetup`).
The main CLI adds this as a subcommand with :func:`add_plan_parser`; bad input prints one line and
exits 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llamapipe.core.errors import PipelineError
from llamapipe.scaleout.planner import (
    ASCEND_910B_MEMORY_GB,
    DTYPES,
    KNOWN_MODELS,
    MC2_TP_OVERLAP,
    ModelShape,
    PlanResult,
    TrainSetup,
    format_table,
    plan,
    read_model_config,
    shape_of,
    to_json,
)

DEFAULT_MODEL = "meta-llama/Llama-2-13b"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TrainSetup()
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="NAME", default=None,
                       help=f"a known model ({', '.join(KNOWN_MODELS)}); default {DEFAULT_MODEL}")
    model.add_argument("--model-config", metavar="JSON", default=None,
                       help="a model config.json (Hugging Face/PaddleNLP; other keys ignored) or a JSON "
                            "object with exactly the six shape fields; a file path or the JSON text itself")
    p.add_argument("--seq-length", type=int, default=defaults.seq_length, help="tokens per sample (max_length)")
    p.add_argument("--micro-batch", type=int, default=defaults.micro_batch_size,
                   help="per_device_train_batch_size")
    p.add_argument("--grad-acc", type=int, default=defaults.gradient_accumulation_steps,
                   help="gradient_accumulation_steps")
    p.add_argument("--cards", "--cards-per-node", dest="cards", type=int, default=defaults.cards_per_node,
                   help="cards per node (default %(default)s)")
    p.add_argument("--nodes", type=int, default=defaults.nodes, help="nodes (default %(default)s)")
    p.add_argument("--memory-gb", type=float, default=ASCEND_910B_MEMORY_GB,
                   help="memory per card in GB (910B: %(default)s)")
    p.add_argument("--sharding-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help=f"ZeRO stage of the sharding group (default {defaults.sharding_stage}; with --lora 0: "
                        f"upstream's LoRA script runs without --sharding)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=defaults.lora,
                   help="LoRA: the base frozen (weights only), adapters trained (weights, gradients, optimizer)")
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank,
                   help="LoRA rank on q, k, v, o, gate, up, down (default %(default)s, llama_npu_lora_N1C8.sh)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=defaults.recompute,
                   help="full activation recompute (upstream N1C8: off)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                   default=defaults.sequence_parallel, help="sequence parallel (upstream: on)")
    p.add_argument("--flash-attention", action=argparse.BooleanOptionalAction,
                   default=defaults.flash_attention, help="flash attention (upstream: on)")
    p.add_argument("--master-grad", action=argparse.BooleanOptionalAction, default=defaults.master_grad,
                   help="amp_master_grad: fp32 gradients (upstream: on)")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                   help="bf16/fp16 = AMP O2 with fp32 master weights; fp32 = plain fp32")
    p.add_argument("--tp-overlap", type=float, default=MC2_TP_OVERLAP,
                   help="share of tensor-parallel communication hidden (MC2: %(default)s)")
    p.add_argument("--dp-overlap", type=float, default=defaults.dp_overlap,
                   help="share of sharding/data-parallel communication hidden (default %(default)s)")
    for degree in ("tp", "pp", "sharding", "dp"):
        p.add_argument(f"--{degree}", type=int, default=None, help=f"pin the {degree} degree")
    p.add_argument("--measured-memory", metavar="PREFLIGHT_JSON", default=None,
                   help="a preflight.json: the HBM per card npu-smi reported there (hbm_gib_per_card, GiB "
                        "counted as GB like the 910B's nominal 64) caps --memory-gb; absent: --memory-gb")
    p.add_argument("--prefer", metavar="TP,PP,SHARDING", default=None,
                   help="choose this layout whenever it fits (e.g. the guide's 8,1,1); otherwise the planner's "
                        "choice, saying why the preferred one was passed over")
    p.add_argument("--expect-layout", metavar="TP,PP,SHARDING", default=None,
                   help="the layout the run was given (parallel: auto, chosen when the workflow was parsed): "
                        "fail unless it fits")
    p.add_argument("--top", type=int, default=5, help="rows in the table (default %(default)s)")
    p.add_argument("--out", metavar="PLAN_JSON", default=None, help="write the whole plan as JSON here")


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to the main CLI's subparsers; its handler is :func:`run_plan`."""
    p = subparsers.add_parser("plan", help="check tp x pp x sharding x dp layouts and estimate memory per card",
                              description=__doc__.split("\n")[0])
    _add_arguments(p)
    # threads: the main CLI prepares the process with it before every handler
    p.set_defaults(handler=run_plan, threads=1)
    return p


def _load_shape(args: argparse.Namespace) -> tuple[str, ModelShape]:
    if args.model_config:
        return args.model_config, shape_of(read_model_config(args.model_config))
    name = args.model or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise PipelineError(f"--model {name!r} is not known (known: {', '.join(KNOWN_MODELS)}); "
                            f"pass its config.json with --model-config")
    return name, ModelShape.from_dict(KNOWN_MODELS[name])


def measured_memory_gb(path: str | None) -> float | None:
    """``hbm_gib_per_card`` of a preflight.json (None: not measured there, e.g. the rehearsal)."""
    if not path:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("hbm_gib_per_card")
    except (OSError, ValueError, AttributeError) as exc:
        raise PipelineError(f"--measured-memory {path}: cannot read it: {exc}") from exc
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise PipelineError(f"--measured-memory {path}: hbm_gib_per_card {value!r} is not a positive number")
    return float(value)


def _memory_gb(args: argparse.Namespace) -> float:
    measured = measured_memory_gb(getattr(args, "measured_memory", None))
    return args.memory_gb if measured is None else min(args.memory_gb, measured)


def _degrees(option: str, value: str) -> tuple[int, int, int]:
    try:
        tp, pp, sharding = (int(x) for x in value.split(","))
    except ValueError:
        raise PipelineError(f"{option} {value!r}: expected TP,PP,SHARDING") from None
    return tp, pp, sharding


def plan_from_args(args: argparse.Namespace) -> PlanResult:
    """The plan the arguments describe (no printing): shared by the CLI and config validation."""
    name, shape = _load_shape(args)
    stage = args.sharding_stage if args.sharding_stage is not None else (0 if args.lora else TrainSetup.sharding_stage)
    setup = TrainSetup(
        seq_length=args.seq_length, micro_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_acc, dtype=args.dtype, master_grad=args.master_grad,
        recompute=args.recompute, sharding_stage=stage,
        sequence_parallel=args.sequence_parallel, flash_attention=args.flash_attention,
        cards_per_node=args.cards, nodes=args.nodes, memory_per_card_gb=_memory_gb(args),
        tp_overlap=args.tp_overlap, dp_overlap=args.dp_overlap, lora=args.lora, lora_rank=args.lora_rank)
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "sharding", "dp") if getattr(args, k) is not None}
    prefer = getattr(args, "prefer", None)
    preferred = dict(zip(("tp", "pp", "sharding"), _degrees("--prefer", prefer))) if prefer else None
    return plan(shape, setup, fixed, name=name, prefer=preferred)


def parse_plan_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llamapipe plan")
    _add_arguments(parser)
    return parser.parse_args(argv)


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, print the table to stdout, write ``--out``; returns a one-line summary.

    Raises :class:`PipelineError` for bad input, for pinned degrees that cannot work, and (after
    printing the table and writing ``--out``) when no layout fits."""
    if args.top < 0:
        raise PipelineError(f"--top must be >= 0, got {args.top}")
    measured = measured_memory_gb(args.measured_memory)
    if args.measured_memory:
        found = f"{measured:g} GiB" if measured is not None else "nothing"
        print(f"memory per card: {_memory_gb(args):g} GB (configured {args.memory_gb:g}, measured by preflight: "
              f"{found} in {args.measured_memory})")
    result = plan_from_args(args)
    print(format_table(result, top=args.top))
    expected = _expected(args, result)
    if args.out:
        from llamapipe.core.atomic import atomic_path

        text = to_json(result) if expected is None else json.dumps(
            {**result.to_dict(), "run_layout": expected}, indent=2, ensure_ascii=False) + "\n"
        with atomic_path(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    if result.chosen is None:
        fixes = "--recompute, a higher --sharding-stage, " + ("" if args.lora else "--lora, ")
        raise PipelineError(f"{result.why}; try {fixes}or more cards")
    if expected is not None and not expected["fits"]:
        _refuse_expected(args, result, measured)
    mem = result.chosen.memory
    return {**result.chosen.layout.to_dict(), "total_gb": round(mem.total_gb, 1) if mem else None,
            "out": args.out}


def _expected(args: argparse.Namespace, result: PlanResult) -> dict[str, Any] | None:
    """The layout the run was given (``--expect-layout``), as plan.json records it: its degrees
    and whether it fits (None without the option)."""
    if not args.expect_layout:
        return None
    tp, pp, sharding = _degrees("--expect-layout", args.expect_layout)
    fits = any((c.layout.tp, c.layout.pp, c.layout.sharding) == (tp, pp, sharding) for c in result.fitting)
    return {"tp": tp, "pp": pp, "sharding": sharding, "fits": fits}


def _refuse_expected(args: argparse.Namespace, result: PlanResult, measured: float | None) -> None:
    """``parallel: auto`` picks its layout when the workflow is parsed, before preflight measures
    the cards: the run's layout must still fit what was measured."""
    tp, pp, sharding = _degrees("--expect-layout", args.expect_layout)
    chosen = result.chosen.layout.label() if result.chosen else "none"
    if measured is None:  # not the preflight's doing: the layout was chosen with other settings
        raise PipelineError(f"tp {tp}, pp {pp}, sharding {sharding} (--expect-layout) does not fit "
                            f"{args.memory_gb:g} GB per card with these settings (the planner picks {chosen})")
    raise PipelineError(f"npu.parallel: auto chose tp {tp}, pp {pp}, sharding {sharding} when the workflow was "
                        f"parsed (npu.memory_per_card_gb {args.memory_gb:g}); it does not fit the "
                        f"{measured:g} GiB per card preflight measured: set npu.memory_per_card_gb: {measured:g} "
                        f"and rerun (the planner then picks {chosen})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamapipe.scaleout.plan_cli", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_plan(args)
    except PipelineError as exc:
        print(f"plan failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
