# The one home of config validation, paths and stage parameters: no other file invents a path.
import json
import os
import shlex
import sys

import yaml

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from llamapipe.commands import (
    build_ops_command,
    cards_for,
    preflight_image_command,
    smoke_collective_command,
    stage_command,
)
from llamapipe.config import coerce_cli_scalars, resolve as resolve_config
from llamapipe.errors import PipelineError
from llamapipe.launch import layout_of, slurm_nodes
from llamapipe.parallel_config import plan_argv
from llamapipe.stale_lock import record_owner as record_lock_owner
from llamapipe.workflow_glue import install_execution_hooks


envvars:
    "PATH",


# `--config 'sft={processes: 2}'`: Snakemake hands nested values over as strings; typed here
# by the schema before it validates them.
with open(os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")) as _f:
    _typed = coerce_cli_scalars(config, yaml.safe_load(_f))
config.clear()
config.update(_typed)
validate(config, schema="../schemas/config.schema.yaml", set_default=True)
try:
    # The target's overlays applied (npu.sft over sft, ...), then checked again as a whole.
    CFG = resolve_config(config)
except PipelineError as err:
    raise WorkflowError(f"config: {err}")
validate(CFG, schema="../schemas/config.schema.yaml")
TARGET = CFG["target"]
# rehearsal=cpu: the npu DAG on this machine's CPU (llamapipe.rehearsal lists the differences).
REHEARSAL = bool(CFG["rehearsal"])
# the rehearsal's clone of the pinned commit, when no checkout is given
PADDLENLP_CLONE = None
if REHEARSAL:
    from snakemake.logging import logger
    from llamapipe.rehearsal import (
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

RESULTS = "results"
PATHS = {
    "preflight": f"{RESULTS}/preflight.json",
    "base_image": f"{RESULTS}/image/base.json",
    "image_preflight": f"{RESULTS}/image/preflight.json",
    "plan": f"{RESULTS}/plan.json",
    "image": f"{RESULTS}/image/npu.json",
    "wheels": f"{RESULTS}/wheels",
    "download_cache": "data/downloads",
    "raw_data": "data/AdvertiseGen",
    "data": f"{RESULTS}/data",
    "train": f"{RESULTS}/data/train.json",
    "dev": f"{RESULTS}/data/dev.json",
    "base_model": f"{RESULTS}/model/base",
    "sft": f"{RESULTS}/sft",
    # Checkpoints live outside every rule's output: Snakemake deletes the outputs of a failed
    # job, and these are what a rerun resumes from.
    "sft_checkpoints": f"{RESULTS}/checkpoints/sft",
    "sft_launch_logs": f"{RESULTS}/logs/sft_launch",
    # npu: all-reduce + matmul on sft's cards, launched as sft is, before sft
    "smoke_collective": f"{RESULTS}/smoke_collective.json",
    "smoke_launch_logs": f"{RESULTS}/logs/smoke_collective_launch",
    "pretrain_data_cache": f"{RESULTS}/cache/pretrain_data",
    "merged": f"{RESULTS}/merged",
    "inference": f"{RESULTS}/inference",
    "predictions": f"{RESULTS}/predictions.json",
    "metrics": f"{RESULTS}/metrics.json",
    "plots": f"{RESULTS}/plots",
    "report_tables": f"{RESULTS}/report",
    "provenance": f"{RESULTS}/provenance.json",
}
# Rules call the package's `llamapipe` CLI; put the venv that runs Snakemake first on PATH so a
# user need not activate it (`.venv/bin/snakemake ...` just works).
os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
)
CONDA_ENV = "../../envs/conda-cpu.yaml"
PROJECT_DIR = os.getcwd()


def log_of(rule_name):
    return f"{RESULTS}/logs/{rule_name}.log"


def bench_of(rule_name):
    return f"{RESULTS}/benchmarks/{rule_name}.tsv"


def stage_params(stage):
    """The config section a stage reads, as JSON; src_length is shared so export and predict
    agree with what sft trained on."""
    sections = {
        "preflight": {
            **CFG["preflight"],
            "target": TARGET,
            "devices": CFG["devices"],
            **(
                {
                    **{
                        k: CFG["npu"][k]
                        for k in (
                            "ascend_root",
                            "dev_root",
                            "device",
                            "pairing",
                            "shm_size",
                            "model_name_or_path",
                        )
                    },
                    "sft_dtype": CFG["sft"]["dtype"],
                    "model_cache": ".cache/paddlenlp/models",  # the containers' PPNLP_HOME
                }
                if TARGET == "npu"
                else {}
            ),
            "runtime": CFG["runtime"],
            "paddlenlp_commit": CFG["npu"]["image"]["paddlenlp_commit"],
            "paddlenlp_checkout": host_checkout(),
        },
        "download_data": {
            k: CFG["data"][k]
            for k in ("url", "sha256", "retries", "connect_timeout", "read_timeout")
        },
        "prepare_data": {
            k: CFG["data"][k] for k in ("on_error", "max_train", "max_dev")
        },
        "init_model": (
            {"model_name_or_path": CFG["npu"]["model_name_or_path"]}
            if TARGET == "npu"
            and CFG["npu"]["model_name_or_path"] != PATHS["base_model"]
            else CFG["model"]
        ),
        "sft": CFG["sft"],
        "merge": {"dtype": CFG["export"]["dtype"]},
        "export": {**CFG["export"], "src_length": CFG["sft"]["src_length"]},
        "predict": CFG["predict"],
        "evaluate": {},
    }
    return json.dumps(sections[stage], sort_keys=True)


def stage_cmd(rule_name, *args, threads=1):
    """The rule's whole command: our CLI call, wrapped for the target and runtime."""
    argv = [
        "llamapipe",
        rule_name.replace("_", "-"),
        "--params",
        stage_params(rule_name),
    ]
    argv += ["--seed", str(CFG["seed"]), "--threads", str(threads)]
    argv += ["--manifest", f"{RESULTS}/manifests/{rule_name}.json", *map(str, args)]
    return stage_command(rule_name, CFG, PATHS, PROJECT_DIR, argv, threads=threads)


def npu_cards(rule_name):
    """resources: npu=<cards>, so `--resources npu=8` keeps two NPU jobs off the same cards."""
    return len(cards_for(rule_name, CFG))


def sft_nodes():
    """resources: nodes=<N> for sft: what the SLURM job must hold (srun: one launcher a node)."""
    return slurm_nodes(layout_of(CFG))


def shell_join(*argv):
    return shlex.join(map(str, argv))


def npu_build_args():
    """Dockerfile.npu build args: base image and the stack pinned together with it."""
    image = CFG["npu"]["image"]
    return {
        "BASE_IMAGE": image["base"],
        "PADDLE_VERSION": image["paddle_version"],
        "PADDLE_CUSTOM_NPU_VERSION": image["paddle_custom_npu_version"],
        "PADDLENLP_COMMIT": image["paddlenlp_commit"],
        "PADDLENLP_REPO": image["paddlenlp_repo"],
        "PADDLE_INDEX": image["paddle_index"],
        "PADDLE_NPU_INDEX": image["paddle_npu_index"],
    }


def preflight_image_cmd():
    """The image checks, in the stage image as the stages run (npu target only)."""
    if TARGET != "npu":
        return "echo 'preflight_image: target npu only' && false"
    return preflight_image_command(CFG, PATHS, PROJECT_DIR)


def build_ops_cmd():
    """paddlenlp_ops from the checkout's csrc/npu, built inside the image (the guide's step 6)."""
    return build_ops_command(CFG, PATHS, PROJECT_DIR)


def smoke_collective_cmd():
    """The collective smoke test: sft's cards, environment and launcher (npu target only)."""
    if TARGET != "npu":
        # npu-only: sft asks for it there alone
        return "echo 'smoke_collective: target npu only' && false"
    return smoke_collective_command(CFG, PATHS, PROJECT_DIR, threads=CFG["threads"])


def smoke_inputs():
    """sft waits for the collective smoke test on npu (a hang costs minutes, not hours).
    ancient: a gate, not data; rerunning the test (new timeout) does not rerun sft."""
    return [ancient(PATHS["smoke_collective"])] if TARGET == "npu" else []


def plan_args():
    """`llamapipe plan` arguments: the configured layout, or the whole search for `auto`."""
    if TARGET != "npu":
        return [
            "--model",
            CFG["npu"]["model_name_or_path"],
        ]  # the plan rule is npu-only
    return plan_argv(CFG, pin=isinstance(config["npu"]["parallel"], dict))


def stage_benchmarks():
    """Benchmark files of the stages a run always has (for the per-stage time plot)."""
    stages = [
        "preflight",
        "download_data",
        "prepare_data",
        "init_model",
        "sft",
        "merge",
    ]
    stages += ["export", "predict", "evaluate"]
    if TARGET == "npu":
        stages += (["pull_image", "build_image"] if image_records() else []) + [
            "preflight_image",
            "build_ops",
            "smoke_collective",
        ]
    return [bench_of(s) for s in stages]


def image_records():
    if TARGET != "npu" or not CFG["npu"]["image"]["build"]:
        return []
    return [PATHS["base_image"], PATHS["image"]]


def host_checkout():
    """A given PaddleNLP checkout on the host, for preflight to check: mounted into the
    containers, or run in place by the local rehearsal. The image's own is not on the host; a
    clone is checked as it is made."""
    if PADDLENLP_CLONE:
        return None
    local = (
        CFG["npu"]["paddlenlp_dir"] if REHEARSAL and CFG["runtime"] == "local" else None
    )
    return CFG["npu"]["paddlenlp_mount"] or local


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
        image_records()[1:]
        + [PATHS["image_preflight"]]
        + ([PATHS["wheels"]] if wheels else [])
    )


def default_targets():
    """What a bare `snakemake` builds: predictions, metrics, and what the report shows."""
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
# (see llamapipe.workflow_glue for why Snakemake needs help here).
STAGE_CHAIN = [
    PATHS["preflight"],
    f"{PATHS['raw_data']}/train.json",
    PATHS["train"],
    PATHS["base_model"],
    PATHS["sft"],
    PATHS["merged"],
    PATHS["inference"],
    PATHS["predictions"],
    PATHS["metrics"],
]
install_execution_hooks(workflow, STAGE_CHAIN, default_target=PATHS["metrics"])


onstart:
    # Runs once the lock is held: names its holder, so a rerun after a kill -9 can tell a stale
    # lock from a live one (llamapipe.stale_lock).
    record_lock_owner()
