"""Inference tokens/s: the static-graph predictor (predict stage) vs dygraph `generate`, batch 1 and 8.

    .venv/bin/python bench/inference_speed.py              # 5 rounds, 16 dev prompts, 96 new tokens
    .venv/bin/python bench/inference_speed.py --quick      # 1 round, 8 prompts, 16 new tokens
    .venv/bin/python bench/inference_speed.py --results results   # reuse a finished run's merged model

The model: the default pipeline's stages (init_model -> sft -> merge -> export) in a temporary
directory (sft: the config's 1000 steps; --quick: 10), or an existing results/ directory.
Contenders, each warmed up once per batch size, then timed round by round in rotating order on
the same prompts with the same max_new_tokens, in one process with OMP_NUM_THREADS=2:
- static: llamapipe.stages.predict.StaticGreedyPredictor as the predict stage runs it, with
  config.yaml's predict settings (threads, onednn, ir_optim, new_executor, ...);
- static_shipped: the predict stage before issue 12: the whole-loop graph (export.graph: loop,
  exported here from the same merged model) under Config defaults (oneDNN on, inplace_pass
  deleted, --threads CPU math threads);
- any named --variants '{"name": {predict settings}}': the same graph under other settings
  (the settings sweep behind bench/RESULTS.md), each checked for the same tokens;
- dygraph: the merged model's generate(decode_strategy="greedy_search"), KV cache on;
- upstream (with --upstream-inference DIR and LLAMAPIPE_PADDLENLP_SRC): PaddleNLP's own
  llm/predict/predictor.py StaticGraphPredictor (create_predictor, --mode static, greedy) on the
  graph upstream's export_model.py wrote (a rehearsal's results/inference), as the rehearsal
  runs it (llamapipe.npu.cpu_shims: inplace_pass deleted). Same prompts, src_length, max new tokens.
Generated tokens are counted per row up to and including eos; every contender's tokens are
checked against dygraph's (identical_tokens).

    LLAMAPIPE_PADDLENLP_SRC=../PaddleNLP .venv/bin/python bench/inference_speed.py \
        --results <rehearsal>/results --upstream-inference <rehearsal>/results/inference --modes static,dygraph,upstream
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import _common as C

MODES = ("static", "static_shipped", "dygraph", "upstream")


def trimmed(ids, eos: int) -> list:
    """Each row's generated ids up to and including eos (what was really generated)."""
    rows = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def count_tokens(ids, eos: int) -> int:
    return sum(len(row) for row in trimmed(ids, eos))


def upstream_predictors(a, batches: list, src_length: int) -> dict:
    """PaddleNLP's own static predictor, one per batch size (its config carries the batch size)."""
    import os

    src = os.environ["LLAMAPIPE_PADDLENLP_SRC"]
    sys.path[:0] = [src, f"{src}/llm", f"{src}/llm/devices"]
    from llamapipe.npu.cpu_shims import predictor_without_inplace_pass

    predictor_without_inplace_pass()
    from llm.predict.predictor import ModelArgument, PredictorArgument, create_predictor

    return {bs: create_predictor(PredictorArgument(
        model_name_or_path=a.upstream_inference, dtype="float32", mode="static", device="cpu", batch_size=bs,
        src_length=src_length, max_length=a.max_new_tokens, decode_strategy="greedy_search"), ModelArgument())
        for bs in batches}


def worker(a) -> dict:
    import numpy as np
    import paddle
    from paddle import inference
    from paddlenlp.transformers import AutoModelForCausalLM

    from llamapipe.core.tokenizer_io import left_padded_batch
    from llamapipe.stages.predict import StaticGreedyPredictor, read_records

    settings = json.loads(a.settings)
    static = StaticGreedyPredictor(a.inference, threads=a.threads, settings=settings)
    export = static.export
    eos, src_length = export["eos_token_id"], export["src_length"]
    shipped = StaticGreedyPredictor(a.shipped_inference, threads=a.threads, settings=settings)
    prefix = str(Path(a.shipped_inference) / shipped.export["model_prefix"])
    config = inference.Config(prefix + ".json", prefix + ".pdiparams")  # predict.py before issue 12
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(a.threads)
    config.delete_pass("inplace_pass")
    config.disable_glog_info()
    shipped.predictor = inference.create_predictor(config)
    variants = {name: StaticGreedyPredictor(a.inference, threads=a.threads, settings={**settings, **v})
                for name, v in json.loads(a.variants or "{}").items()}
    model = AutoModelForCausalLM.from_pretrained(a.merged, dtype=export["dtype"])
    model.eval()
    srcs = [r["src"] for r in read_records(a.dev)[: a.prompts]]

    def dygraph(batch):
        feeds = {k: paddle.to_tensor(v) for k, v in left_padded_batch(static.tok, batch, src_length).items()}
        ids, _ = model.generate(**feeds, max_new_tokens=a.max_new_tokens, decode_strategy="greedy_search",
                                pad_token_id=export["pad_token_id"], bos_token_id=export["bos_token_id"],
                                eos_token_id=eos)
        return ids.numpy()

    fns = {"static": lambda b: static.generate_ids(b, a.max_new_tokens),
           "static_shipped": lambda b: shipped.generate_ids(b, a.max_new_tokens),
           "dygraph": dygraph}
    for name, p in variants.items():
        fns[name] = lambda b, p=p: p.generate_ids(b, a.max_new_tokens)
    modes = [m for m in MODES if m in a.modes.split(",")] + list(variants)
    batches = [int(b) for b in a.batches.split(",")]
    if "upstream" in modes:
        ups = upstream_predictors(a, batches, src_length)
        fns["upstream"] = lambda b: ups[len(b) if len(b) in ups else max(ups)].predict(b, return_tokens=True)[1]

    def one_pass(mode, bs):
        outs, start = [], time.perf_counter()
        for i in range(0, len(srcs), bs):
            outs.append(fns[mode](srcs[i:i + bs]))
        return time.perf_counter() - start, outs

    result: dict = {"prompts": len(srcs), "max_new_tokens": a.max_new_tokens, "batches": {}}
    for bs in batches:
        warm = {}
        for m in modes:  # first call per shape: graph/kernels/oneDNN primitives, timed apart
            warm[m] = one_pass(m, bs)
        ref = [trimmed(o, eos) for o in warm["dygraph"][1]] if "dygraph" in warm else None
        rounds: dict[str, list[float]] = {m: [] for m in modes}
        tokens = {m: sum(count_tokens(o, eos) for o in warm[m][1]) for m in modes}
        for r in range(a.runs):
            for m in modes[r % len(modes):] + modes[: r % len(modes)]:
                rounds[m].append(one_pass(m, bs)[0])
        result["batches"][str(bs)] = {
            m: {"first_call_seconds": round(warm[m][0], 3), "seconds": rounds[m], "tokens": tokens[m],
                "identical_tokens": None if ref is None else [trimmed(o, eos) for o in warm[m][1]] == ref}
            for m in modes
        }
    result["decode_steps_per_batch"] = {
        str(bs): [int(np.asarray(o).shape[1]) for o in one_pass(modes[0], bs)[1]] for bs in batches
    }
    return result


def worker_main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    for flag in ("--inference", "--merged", "--dev", "--result", "--modes", "--batches", "--upstream-inference",
                 "--settings", "--variants", "--shipped-inference"):
        ap.add_argument(flag)
    for flag in ("--prompts", "--max-new-tokens", "--runs", "--threads"):
        ap.add_argument(flag, type=int)
    a = ap.parse_args(argv)
    Path(a.result).write_text(json.dumps(worker(a)))


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    ap.add_argument("--results", help="reuse this results/ directory (merged/, inference/, data/dev.json)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: config.yaml predict.max_new_tokens")
    ap.add_argument("--sft-steps", type=int, default=None, help="default: config.yaml sft.max_steps")
    ap.add_argument("--modes", default="static,static_shipped,dygraph")
    ap.add_argument("--variants", help='more static contenders: JSON {"name": {predict settings}}')
    ap.add_argument("--model", help="JSON over config.yaml's model section for a fresh run, e.g. "
                    '\'{"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 688}\'')
    ap.add_argument("--upstream-inference", help="upstream export_model.py's output (a rehearsal's results/inference)")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    cfg = C.load_config()
    if args.quick:
        runs, prompts, max_new, sft_steps = 1, 8, 16, 10
    else:
        runs, prompts = args.runs, args.prompts
        max_new = args.max_new_tokens or cfg["predict"]["max_new_tokens"]
        sft_steps = args.sft_steps or cfg["sft"]["max_steps"]
    model = {**cfg["model"], **json.loads(args.model or "{}")}
    result: dict = {"machine": C.machine(), "quick": args.quick, "threads": args.threads, "model": model,
                    "predict_settings": {k: cfg["predict"].get(k) for k in cfg["predict"]},
                    "variants": json.loads(args.variants or "{}")}
    with C.workdir(args.keep, "bench-infer-") as tmp:
        work = Path(tmp)
        if args.results:
            r = Path(args.results).resolve()
            paths = {"merged": r / "merged", "inference": work / "inference", "dev": r / "data/dev.json"}
            result["model_from"] = str(r)
            (work / "logs").mkdir(exist_ok=True)  # the merged model exported as config.yaml's export says
            C.llamapipe("export", C.stage_params(cfg)["export"], "--merged", paths["merged"], "--out",
                        paths["inference"], log=work / "logs/export.log")
        else:
            paths = C.build_workspace(work, threads=args.threads, until="export", sft_steps=sft_steps, model=model)
            result["model_from"] = f"fresh run, sft {sft_steps} steps"
        shipped = work / "inference_loop"  # the whole-loop graph export wrote before issue 12
        C.llamapipe("export", {**C.stage_params(cfg)["export"], "graph": "loop"}, "--merged", paths["merged"],
                    "--out", shipped, log=work / "logs/export_loop.log")
        raw = C.run_worker(Path(__file__).resolve(), [
            "--worker", "--inference", str(paths["inference"]), "--merged", str(paths["merged"]),
            "--dev", str(paths["dev"]), "--prompts", str(prompts), "--max-new-tokens", str(max_new),
            "--shipped-inference", str(shipped),
            "--runs", str(runs), "--threads", str(args.threads), "--modes", args.modes, "--batches", args.batches,
            "--settings", json.dumps(cfg["predict"]), *(["--variants", args.variants] if args.variants else []),
            *(["--upstream-inference", str(Path(args.upstream_inference).resolve())]
              if args.upstream_inference else []),
        ], C.thread_env(args.threads), work / "logs/inference_worker.log")
    result.update({k: raw[k] for k in ("prompts", "max_new_tokens", "decode_steps_per_batch")})
    table: dict = {}
    for bs, per_mode in raw["batches"].items():
        entry = {}
        for m, d in per_mode.items():
            entry[m] = {"tokens": d["tokens"], "identical_tokens": d["identical_tokens"],
                        "first_call_seconds": d["first_call_seconds"], "seconds": C.summary(d["seconds"]),
                        "tokens_per_second": C.summary([d["tokens"] / s for s in d["seconds"]], 1)}
        if "dygraph" in per_mode:
            dyn = per_mode["dygraph"]["seconds"]
            for m in per_mode:
                if m != "dygraph":  # > 1: faster than dygraph generate, paired round by round
                    entry[f"{m}_speedup_over_dygraph"] = C.paired_ratio(dyn, per_mode[m]["seconds"])
        table[f"batch_{bs}"] = entry
    result["results"] = table
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
