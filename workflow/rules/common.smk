# The one home of config validation, paths and stage parameters: no other file invents a path.
import json
import os
import re
import shlex
import sys

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from llamapipe.config.paths import (
    PATHS,
    RESULTS,
    WORKFLOW_DIR_ENV,
    bench_of,
    image_records,
    log_of,
    stage_benchmarks,
)
from llamapipe.runners.commands import cards_for, rule_command
from llamapipe.config import npu_overrides, resolve as resolve_config
from llamapipe.config.validation import checked, coerce, config_schema, validate
from llamapipe.config.variants import (
    COMPARISON_HTML,
    COMPARISON_TSV,
    PLAIN,
    VARIANTS_DIR,
    resolve_variants,
    variant_dir,
    variant_run,
)
from llamapipe.core.errors import PipelineError
from llamapipe.scaleout.launch import layout_of, slurm_nodes
from llamapipe.snakemake_hooks.stale_lock import record_owner as record_lock_owner
from llamapipe.snakemake_hooks.workflow_glue import install_execution_hooks


envvars:
    "PATH",


# a relative file: url not in the project (snakemake -d OTHER) is the checkout's: the config
# checks and the jobs look there (llamapipe.config.paths.file_url_path)
os.environ[WORKFLOW_DIR_ENV] = workflow.basedir


# config.yaml + --configfile + --config against the schema (llamapipe.config.validation): the
# strings Snakemake makes of nested --config values ('npu={sft: {max_steps: 500}}') typed by the
# schema, defaults filled in, every problem listed in one error before any rule reads a value.
_SCHEMA = config_schema(
    os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")
)
try:
    _checked = checked(coerce(config, _SCHEMA), _SCHEMA)
except PipelineError as err:
    raise WorkflowError(str(err))
config.clear()
config.update(_checked)
# target npu: say which of the user's sft/export/predict values (those that differ from
# config.yaml's, defaults filled in) npu.<section> overrides.
with open(os.path.join(workflow.basedir, "config.yaml")) as _f:
    _shipped, _ = validate(yaml.safe_load(_f), _SCHEMA)
for _line in npu_overrides(config, _shipped):
    logger.warning(_line)
try:
    # The target's overlays applied (npu.sft over sft, ...), then checked again as a whole. The
    # plain run's config has no variants: with none, every command is what it was before them.
    CFG = resolve_config({k: v for k, v in config.items() if k != "variants"}, _shipped)
except PipelineError as err:
    raise WorkflowError(f"config: {err}")
try:
    checked(CFG, _SCHEMA, defaults=False)
except PipelineError as err:
    raise WorkflowError(f"the config resolved for target {CFG['target']}: {err}")
try:
    # variants: each name's config (the project's with its overrides), checked as the plain one
    VARIANT_CFG = resolve_variants(config, _shipped, _SCHEMA)
except PipelineError as err:
    raise WorkflowError(str(err))
VARIANTS = {name: variant_run(name, cfg, CFG) for name, cfg in VARIANT_CFG.items()}
for _name, _run in VARIANTS.items():
    logger.info(
        f"variant {_name}: {variant_dir(_name)}/; shares "
        + (", ".join(_run.shared) or "no data or model stage")
        + " with the plain run"
    )
TARGET = CFG["target"]
# rehearsal=cpu: the npu DAG on this machine's CPU (llamapipe.config.rehearsal lists the differences).
REHEARSAL = bool(CFG["rehearsal"])
# the rehearsal's clone of the pinned commit, when no checkout is given
PADDLENLP_CLONE = None
if REHEARSAL:
    from snakemake.logging import logger
    from llamapipe.config.rehearsal import (
        clone_dir,
        describe as describe_rehearsal,
        given_checkout,
    )

    PADDLENLP_CLONE = None if given_checkout(CFG) else clone_dir(CFG)

    logger.info(
        "rehearsal=cpu: the npu target on CPU; what differs from a real NPU run:\n"
        + "\n".join(
            f"  {d['key']} = {json.dumps(d['value'])}: {d['reason']}"
            for d in describe_rehearsal(CFG)
        )
    )

# Rules call the package's `llamapipe` CLI; put the venv that runs Snakemake first on PATH so a
# user need not activate it (`.venv/bin/snakemake ...` just works).
os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
)
CONDA_ENV = "../../envs/conda-cpu.yaml"
PROJECT_DIR = os.getcwd()


# a variant's results directory, as rule outputs name it
VARIANT = variant_dir("{variant}")


wildcard_constraints:
    # the configured names only (none: a pattern that matches nothing)
    variant="|".join(re.escape(name) for name in VARIANTS) or "(?!)",


def rule_cmd(rule_name, threads=1, variants=(), cfg=None, run=PLAIN):
    """The rule's whole command (llamapipe.runners.commands.rule_command): our CLI call, wrapped
    for the target and runtime (``variants``: the names the comparison compares; ``cfg``, ``run``:
    a variant's config and paths, else the plain run's)."""
    return rule_command(
        rule_name,
        CFG if cfg is None else cfg,
        PROJECT_DIR,
        threads=threads,
        checkout_clone=PADDLENLP_CLONE,
        auto_layout=not isinstance(config["npu"]["parallel"], dict),
        run=run,
        variants=variants,
    )


def variant_cmd(rule_name, threads_of=lambda cfg: 1):
    """params.cmd of a variant's rule: rule_cmd with the variant's config and paths
    (``threads_of(cfg)``: its threads, as the plain rule computes them from the config).
    """
    return lambda wildcards: rule_cmd(
        rule_name,
        threads_of(VARIANT_CFG[wildcards.variant]),
        cfg=VARIANT_CFG[wildcards.variant],
        run=VARIANTS[wildcards.variant],
    )


def variant_path(key, name=None):
    """An input of a variant's rule: its own path, or the plain run's for a shared stage
    (``name``: a file in that directory)."""
    return lambda wildcards: os.path.join(
        VARIANTS[wildcards.variant].paths[key], *([name] if name else [])
    )


def variant_threads(threads_of):
    return lambda wildcards: threads_of(VARIANT_CFG[wildcards.variant])


def variant_benchmarks(wildcards):
    """The benchmark files of a variant's stages (a shared stage's are the plain run's)."""
    return VARIANTS[wildcards.variant].benchmarks(VARIANT_CFG[wildcards.variant])


def predict_threads(cfg):
    """predict.threads: paddle.inference's CPU threads (measured default 1, bench/RESULTS.md)."""
    return cfg["predict"]["threads"] or cfg["threads"]


def config_threads(cfg):
    return cfg["threads"]


def comparison_inputs(wildcards):
    """Every variant's finished run (its metrics, predictions, provenance and plots)."""
    if not VARIANTS:
        raise WorkflowError(
            f"{COMPARISON_HTML} compares the config's variants, and it has none: add some, e.g. "
            "--config 'variants={full: {}, lora: {sft: {lora: true}}}' (README, Variants)"
        )
    return [
        f"{variant_dir(name)}/{output}"
        for name in VARIANTS
        for output in (
            "metrics.json",
            "predictions.json",
            "provenance.json",
            "plots/loss.png",
        )
    ]


def npu_cards(rule_name):
    """resources: npu=<cards>, so `--resources npu=8` keeps two NPU jobs off the same cards."""
    return len(cards_for(rule_name, CFG))


def sft_nodes():
    """resources: nodes=<N> for sft: what the SLURM job must hold (srun: one launcher a node)."""
    return slurm_nodes(layout_of(CFG))


def smoke_inputs():
    """sft waits for the collective smoke test on npu (a hang costs minutes, not hours).
    ancient: a gate, not data; rerunning the test (new timeout) does not rerun sft."""
    return [ancient(PATHS["smoke_collective"])] if TARGET == "npu" else []


def upstream_inputs():
    """The stages that run PaddleNLP's scripts wait for the rehearsal's clone, if it makes one."""
    return [PADDLENLP_CLONE] if PADDLENLP_CLONE else []


def plan_inputs():
    return [PATHS["plan"]] if TARGET == "npu" else []


def image_inputs(wheels=False):
    """On npu every stage runs in the built image, once its checks passed (and export/predict
    need the ops wheel)."""
    if TARGET != "npu":
        return []
    return (
        image_records(CFG)[1:]
        + [PATHS["image_preflight"]]
        + ([PATHS["wheels"]] if wheels else [])
    )


def default_targets():
    """What a bare `snakemake` builds: predictions, metrics, and what the report shows; with
    variants, their comparison (each variant's run, not the plain one)."""
    if VARIANTS:
        return [COMPARISON_HTML]
    return [
        PATHS["predictions"],
        PATHS["metrics"],
        f"{PATHS['plots']}/loss.png",
        f"{PATHS['plots']}/stage_times.png",
        f"{PATHS['report_tables']}/metrics.html",
        f"{PATHS['report_tables']}/predictions.html",
        PATHS["provenance"],
    ]


# Stage outputs in DAG order: a deleted intermediate is rebuilt with what follows it
# (see llamapipe.snakemake_hooks.workflow_glue for why Snakemake needs help here).
STAGE_CHAIN = PLAIN.chain()
install_execution_hooks(
    workflow,
    STAGE_CHAIN,
    default_target=PATHS["metrics"],
    variant_chains={name: run.chain() for name, run in VARIANTS.items()},
    variants_dir=VARIANTS_DIR,
)


onstart:
    # Runs once the lock is held: names its holder, so a rerun after a kill -9 can tell a stale
    # lock from a live one (llamapipe.snakemake_hooks.stale_lock).
    record_lock_owner()
