# The one home of config validation, paths and stage parameters: no other file invents a path.
import json
import os
import sys

from snakemake.utils import validate

from llamapipe.workflow_glue import install_gap_check


envvars:
    "PATH",


validate(config, schema="../schemas/config.schema.yaml", set_default=True)

RESULTS = "results"
PATHS = {
    "preflight": f"{RESULTS}/preflight.json",
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
    "merged": f"{RESULTS}/merged",
    "inference": f"{RESULTS}/inference",
    "predictions": f"{RESULTS}/predictions.json",
    "metrics": f"{RESULTS}/metrics.json",
}
# Rules call the package's `llamapipe` CLI; put the venv that runs Snakemake first on PATH so a
# user need not activate it (`.venv/bin/snakemake ...` just works).
os.environ["PATH"] = os.pathsep.join(
    [os.path.dirname(sys.executable), os.environ.get("PATH", "")]
)
CONDA_ENV = "../../envs/conda-cpu.yaml"


def log_of(rule_name):
    return f"{RESULTS}/logs/{rule_name}.log"


def bench_of(rule_name):
    return f"{RESULTS}/benchmarks/{rule_name}.tsv"


def stage_params(stage):
    """The config section a stage reads, as JSON; src_length is shared so export and predict
    agree with what sft trained on."""
    sections = {
        "preflight": config["preflight"],
        "download": {k: config["data"][k] for k in ("url", "sha256", "retries")},
        "prepare_data": {
            k: config["data"][k] for k in ("on_error", "max_train", "max_dev")
        },
        "init_model": config["model"],
        "sft": config["sft"],
        "merge": {"dtype": config["export"]["dtype"]},
        "export": {**config["export"], "src_length": config["sft"]["src_length"]},
        "predict": config["predict"],
    }
    return json.dumps(sections[stage], sort_keys=True)


def default_targets():
    """What a bare `snakemake` builds: the predictions (the guide's end point). Metrics are
    asked for by name (`make run` does), so `--forcerun export results/predictions.json` (whose
    --forcerun swallows the file too, leaving the default target) redoes export and predict only.
    """
    return [PATHS["predictions"]]


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
install_gap_check(workflow, STAGE_CHAIN, default_target=PATHS["predictions"])
