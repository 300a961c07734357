"""One CLI, one subcommand per stage: what every Snakemake rule calls.

    python -m llamapipe sft --params '{...}' --train results/data/train.json ...

``--params`` is the stage's own config section as JSON (Snakemake derives it from config.yaml),
paths are explicit arguments. Errors a user can fix print as one message, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from llamapipe.core.errors import PipelineError
from llamapipe.core.logs import configure_logging
from llamapipe.core.paddlenlp_import import TRANSFORMERS, import_parts


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--params is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


def _stage_preflight(a: argparse.Namespace) -> Any:
    from llamapipe.stages import preflight

    return preflight.run(a.params, a.out)


def _stage_preflight_image(a: argparse.Namespace) -> Any:
    from llamapipe.stages import preflight_image

    return preflight_image.run(a.params, a.out)


def _pull_image(a: argparse.Namespace) -> Any:
    from llamapipe.stages import image

    return image.pull(a.image, a.out)


def _build_image(a: argparse.Namespace) -> Any:
    from llamapipe.stages import image

    return image.build(a.dockerfile, a.tag, json.loads(a.build_args), a.out)


def _collect_sft(a: argparse.Namespace) -> Any:
    from llamapipe.stages import collect

    return collect.collect_sft(a.ckpt_dir, a.out, a.launch_logs, int(a.save_total_limit))


def _fetch_paddlenlp(a: argparse.Namespace) -> Any:
    from llamapipe.npu.checkout import clone

    return clone(a.repo, a.commit, a.out)


def _check_outputs(a: argparse.Namespace) -> Any:
    from llamapipe.stages import collect

    return collect.check_outputs(a.kind, a.path)


def _collect_predictions(a: argparse.Namespace) -> Any:
    from llamapipe.stages import collect

    return collect.collect_predictions(a.upstream, a.dev, a.out)


def _stage_download_data(a: argparse.Namespace) -> Any:
    from llamapipe.stages import download

    p = a.params
    given = {k: p[k] for k in ("retries", "connect_timeout", "read_timeout", "md5", "sha256_key") if k in p}
    return download.run(p["url"], p["sha256"], a.out, a.cache_dir, **given)


def _stage_prepare_data(a: argparse.Namespace) -> Any:
    from llamapipe.stages import prepare_data

    p = a.params
    return prepare_data.run(a.src, a.out, on_error=p["on_error"], max_train=p.get("max_train"),
                            max_dev=p.get("max_dev"))


def _stage_init_model(a: argparse.Namespace) -> Any:
    from llamapipe.stages import init_model

    return init_model.run(a.params, a.train, a.out, seed=a.seed)


def _stage_sft(a: argparse.Namespace) -> Any:
    from llamapipe.stages import sft

    return sft.run(a.params, a.train, a.base, a.out, a.ckpt_dir, seed=a.seed)


def _stage_merge(a: argparse.Namespace) -> Any:
    from llamapipe.stages import merge

    return merge.run(a.params, a.sft, a.base, a.out)


def _stage_export(a: argparse.Namespace) -> Any:
    from llamapipe.stages import export

    return export.run(a.params, a.merged, a.out)


def _stage_predict(a: argparse.Namespace) -> Any:
    """The pipeline gives the whole predict section; a user may give part of it or none: the rest
    comes from config.yaml in the working directory, else the schema's defaults and the export's
    own max_new_tokens (``predict.resolve_params`` logs which)."""
    from llamapipe.stages import predict

    a.params, _ = predict.resolve_params(a.params, a.inference)  # the manifest records what was used
    return predict.run(a.params, a.inference, a.dev, a.out, threads=a.threads)


def _stage_evaluate(a: argparse.Namespace) -> Any:
    from llamapipe.stages import evaluate

    return evaluate.run(a.predictions, a.out)


# name -> (handler, help, [(flag, help)]) ; every stage also takes --params/--threads/--seed.
STAGES: dict[str, Any] = {
    "preflight": (_stage_preflight, "check the host and the Python stack", [("--out", "preflight.json")]),
    "preflight-image": (_stage_preflight_image, "check the stage image: CANN, kernels, ATB, plugin, Python stack",
                        [("--out", "image/preflight.json")]),
    "download-data": (_stage_download_data, "fetch, verify and safely extract the data archive",
                 [("--out", "extraction dir"), ("--cache-dir", "where the archive is kept")]),
    "prepare-data": (_stage_prepare_data, "validate src/tgt json lines and write the splits",
                     [("--src", "extracted data dir"), ("--out", "output dir")]),
    "init-model": (_stage_init_model, "tiny LLaMA + tokenizer trained on the train text",
                   [("--train", "train.json"), ("--out", "model dir")]),
    "sft": (_stage_sft, "fine-tune (full or LoRA) with PaddleNLP's Trainer",
            [("--train", "train.json"), ("--base", "base model dir"), ("--out", "output dir"),
             ("--ckpt-dir", "resumable checkpoints (outside the output)")]),
    "merge": (_stage_merge, "LoRA / shards into one checkpoint, config.json fix-up",
              [("--sft", "sft output"), ("--base", "base model dir"), ("--out", "merged dir")]),
    "export": (_stage_export, "static-graph export of the merged model",
               [("--merged", "merged dir"), ("--out", "inference dir")]),
    "predict": (_stage_predict, "static-graph greedy inference over the dev prompts or your own (without "
                "--params: config.yaml's predict section, else the defaults and the export's max_new_tokens)",
                [("--inference", "inference dir"),
                 ("--dev", 'JSON lines: {"src": ...} each, "tgt" optional (dev.json has it)'),
                 ("--out", 'predictions.json: {"src", "tgt" if given, "prediction"} each')]),
    "evaluate": (_stage_evaluate, "BLEU-4 and ROUGE-1/2/L",
                 [("--predictions", "predictions.json"), ("--out", "metrics.json")]),
}


def _plots(a: argparse.Namespace) -> Any:
    from llamapipe.stages import report

    out = {"training": report.plot_training(a.train_log, f"{a.out}/loss.png")}
    out["stage_seconds"] = report.plot_stage_times(a.benchmarks.split(","), f"{a.out}/stage_times.png")
    return out


def _tables(a: argparse.Namespace) -> Any:
    from llamapipe.stages import report

    return report.write_tables(a.metrics, a.predictions, a.out)


def _provenance(a: argparse.Namespace) -> Any:
    from llamapipe.stages import provenance

    record = provenance.collect(a.manifests, json.loads(a.config), ".", a.images.split(",") if a.images else [], a.out)
    return {"stages": sorted(record["stages"]), "git": record["git"]}


def _compare(a: argparse.Namespace) -> Any:
    from llamapipe.stages import compare

    labels = [label.strip() for label in a.labels.split(",")] if a.labels is not None else None
    runs = compare.load_runs(a.results, labels)
    table = compare.comparison(runs)
    print(compare.summary_text(table), flush=True)
    if a.html or a.tsv:
        return compare.write_page(runs, a.html, a.tsv)
    return {"runs": len(runs), "differing_config_keys": len(table.config)}


# Helpers around the stages: (handler, help, [(flag, help)]) with no --params. A flag is required
# unless its entry adds argparse options as a third item ((flag, help, {...})); a name without
# dashes is positional.
TOOLS: dict[str, Any] = {
    "pull-image": (_pull_image, "pull the pinned base image, record its digest",
                   [("--image", "image reference"), ("--out", "base.json")]),
    "build-image": (_build_image, "build Dockerfile.npu on the base image",
                    [("--dockerfile", "Dockerfile"), ("--tag", "image tag"), ("--build-args", "JSON object"),
                     ("--out", "npu.json")]),
    "collect-sft": (_collect_sft, "upstream run_finetune.py output -> results/sft",
                    [("--ckpt-dir", "upstream output_dir"), ("--launch-logs", "paddle.distributed.launch --log_dir"),
                     ("--out", "sft output"), ("--save-total-limit", "checkpoints kept (sft.save_total_limit)")]),
    "fetch-paddlenlp": (_fetch_paddlenlp, "clone PaddleNLP at the pinned commit (the rehearsal, no checkout given)",
                        [("--repo", "git URL"), ("--commit", "commit"), ("--out", "checkout dir")]),
    "check-outputs": (_check_outputs, "fail unless an upstream step wrote its outputs",
                      [("--kind", "wheels | model | export"), ("--path", "what it wrote")]),
    "plots": (_plots, "training loss / learning rate and per-stage time plots (PNG)",
              [("--train-log", "train_log.jsonl"), ("--benchmarks", "comma-separated benchmark TSVs"),
               ("--out", "plots dir")]),
    "report-tables": (_tables, "metrics and prediction samples as HTML tables for the report",
                      [("--metrics", "metrics.json"), ("--predictions", "predictions.json"), ("--out", "dir")]),
    "provenance": (_provenance, "gather stage manifests, git state, config, images into one record",
                   [("--manifests", "manifest dirs, comma-separated (a variant: the plain run's, then its own)"),
                    ("--config", "resolved config JSON"),
                    ("--images", "comma-separated image records (may be empty)"), ("--out", "provenance.json")]),
    "compare": (_compare, "metrics (best marked), loss curves, stage times, differing config keys and sample "
                "predictions of one or more results dirs; prints metrics and config differences",
                [("results", "results dirs: results, results/variants/<name>, ... (one or more)",
                  {"nargs": "+", "metavar": "DIR"}),
                 ("--labels", "comma-separated run names, one per DIR (default: <name> for .../variants/<name>, "
                  "else DIR as given)", {"required": False}),
                 ("--html", "write the comparison page (one self-contained HTML file) here", {"required": False}),
                 ("--tsv", "write one row per run (metrics, config.<key>, seconds.<stage>) here",
                  {"required": False})]),
    "collect-predictions": (_collect_predictions, "upstream predictor.py output -> predictions.json",
                            [("--upstream", "predictor output"), ("--dev", "dev.json"), ("--out", "predictions.json")]),
}

# Stages that always import PaddleNLP, and which of its parts (None: the whole package, which sft's
# Trainer and peft need). Its logger is lowered before they run. The whole package costs ~3.6 s
# and ~230 MiB over Paddle alone, its transformers part ~0.8 s (bench/RESULTS.md). merge imports
# it only for LoRA or tensor-parallel ranks, predict not at all (sentencepiece, paddle.inference).
PADDLENLP_STAGES = {"init-model": TRANSFORMERS, "sft": None, "export": TRANSFORMERS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamapipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (handler, help_text, paths) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", type=_params, default={}, help="the stage's config section as JSON")
        p.add_argument("--threads", type=int, default=1, help="CPU threads (OMP/MKL) for this stage")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--manifest", default=None,
                       help="write the stage manifest (inputs' hashes, versions, times) here")
        for flag, flag_help in paths:
            p.add_argument(flag, required=True, help=flag_help)
        p.set_defaults(handler=handler, path_flags=[flag for flag, _ in paths])
    for name, (handler, help_text, flags) in TOOLS.items():
        p = sub.add_parser(name, help=help_text)
        for flag, flag_help, *options in flags:
            kwargs = {"required": True} if flag.startswith("-") else {}  # argparse refuses `required` on positionals
            kwargs.update(*options)
            p.add_argument(flag, help=flag_help, **kwargs)
        p.set_defaults(handler=handler, threads=1)
    from llamapipe.runners.container import add_container_run_parser
    from llamapipe.scaleout.plan_cli import add_plan_parser
    from llamapipe.serving.cli import add_serving_parsers

    add_plan_parser(sub)
    add_serving_parsers(sub)
    add_container_run_parser(sub).set_defaults(threads=1)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run one stage or tool. As the process's own entry (``argv`` None) a stage that imported
    Paddle ends without the interpreter's teardown (``_exit_after_paddle``)."""
    started = time.time()  # stage time includes process start-up work (imports): it is real cost
    args = build_parser().parse_args(argv)
    configure_logging()
    from llamapipe.core.manifest import now

    started_at = now()
    from llamapipe.core.paddle_env import prepare, quiet_paddlenlp

    prepare(args.threads)
    if args.stage in PADDLENLP_STAGES:
        import_parts(PADDLENLP_STAGES[args.stage])
        quiet_paddlenlp()
    log = logging.getLogger("llamapipe")
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        result = handler(args)
    except PipelineError as exc:
        log.error("%s failed: %s", args.stage, exc)
        sys.exit(2)
    if args.stage == "container-run":  # the container's exit code is the command's
        log.info("container exited with %s after %.1fs", result, time.time() - started)
        sys.exit(result)
    # under paddle.distributed.launch (sft.processes > 1) rank 0 alone writes the manifest
    if getattr(args, "path_flags", None) and os.environ.get("PADDLE_TRAINER_ID", "0") == "0":
        _write_manifest(args, started_at)
    log.info("%s finished in %.1fs: %s", args.stage, time.time() - started,
             json.dumps(result, ensure_ascii=False, default=str))
    # not under a profiler or debugger (python -m cProfile writes its stats after main returns)
    if argv is None and "paddle" in sys.modules and sys.getprofile() is None and sys.gettrace() is None:
        _exit_after_paddle()


def _exit_after_paddle() -> None:
    """Exit 0 once the stage's outputs are on disk, skipping only the freeing of every module:
    after Paddle that teardown takes ~0.3 s, after PaddleNLP ~1 s (bench/RESULTS.md). The exit
    handlers still run (Paddle's own clean-up, logging's flush), then the streams are flushed."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Path flags that are neither inputs nor outputs of the stage (state and caches).
NOT_INPUTS = {"out", "ckpt_dir", "cache_dir"}


def _write_manifest(args: argparse.Namespace, started_at: str) -> None:
    from llamapipe.core.manifest import write_stage_manifest

    names = [flag.lstrip("-").replace("-", "_") for flag in args.path_flags]
    inputs = {n: getattr(args, n) for n in names if n not in NOT_INPUTS}
    write_stage_manifest(args.stage, inputs, [args.out], args.params, started_at, args.manifest)
