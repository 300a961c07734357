"""Every path of a run, project-relative: the rules' inputs and outputs, and what the commands
and checks name. No other file invents a path (``workflow/rules/common.smk`` reads these)."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

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
    "manifests": f"{RESULTS}/manifests",
}
# containers' PPNLP_HOME (named models downloaded once) and other downloads that outlive a container
CACHE_DIR = ".cache"
MODEL_CACHE = f"{CACHE_DIR}/paddlenlp/models"


def log_of(rule: str) -> str:
    return f"{RESULTS}/logs/{rule}.log"


def bench_of(rule: str) -> str:
    return f"{RESULTS}/benchmarks/{rule}.tsv"


def manifest_of(rule: str) -> str:
    return f"{PATHS['manifests']}/{rule}.json"


def builds_base_model(cfg: dict) -> bool:
    """Whether init_model builds the base model sft trains (the ``model:`` section, a tiny LLaMA):
    always on cpu; on npu when ``npu.model_name_or_path`` names the directory it builds (the
    rehearsal), and not for a hub name or the user's own weights."""
    return cfg["target"] != "npu" or (cfg.get("npu") or {}).get("model_name_or_path") == PATHS["base_model"]


def image_records(cfg: dict) -> list[str]:
    """The records of the images this run builds (npu with ``npu.image.build``): base, then stage image."""
    if cfg["target"] != "npu" or not cfg["npu"]["image"]["build"]:
        return []
    return [PATHS["base_image"], PATHS["image"]]


def stage_benchmark_names(cfg: dict) -> list[str]:
    """The stages a run always has (for the per-stage time plot)."""
    stages = ["preflight", "download_data", "prepare_data", "init_model", "sft", "merge", "export", "predict",
              "evaluate"]
    if cfg["target"] == "npu":
        stages += (["pull_image", "build_image"] if image_records(cfg) else []) + [
            "preflight_image", "build_ops", "smoke_collective"]
    return stages


def stage_benchmarks(cfg: dict) -> list[str]:
    """Benchmark files of the plain run's stages."""
    return [bench_of(s) for s in stage_benchmark_names(cfg)]


def _is_local_path(name: str, project: str) -> bool:
    """A model setting that names a directory rather than a hub id ("org/name"): absolute,
    explicitly relative, the model init_model builds, or a directory that exists in the project."""
    return (os.path.isabs(name) or name.startswith(("./", "../")) or name == PATHS["base_model"]
            or os.path.isdir(os.path.join(project, name)))


def local_model_dir(cfg: dict, project: str) -> str | None:
    """``npu.model_name_or_path`` as an absolute host directory when it names one (relative paths
    are the project's, resolved before any ``cd``), else None (a hub id upstream downloads)."""
    name = (cfg.get("npu") or {}).get("model_name_or_path")
    if cfg["target"] != "npu" or not name or not _is_local_path(name, project):
        return None
    return os.path.normpath(os.path.join(project, name))


def model_config_file(cfg: dict, project: str = ".") -> str | None:
    """Where the trained model's shape is read at parse time: ``npu.model_config`` (a file or the
    JSON itself), else the ``config.json`` of a local model directory that has one."""
    given = (cfg.get("npu") or {}).get("model_config")
    if given:
        return given
    local = local_model_dir(cfg, os.path.abspath(project))
    config_json = os.path.join(local, "config.json") if local else None
    return config_json if config_json and os.path.isfile(config_json) else None


def file_url_path(url: str, project: str | None = None, workflow_dir: str | None = None) -> str | None:
    """The absolute path of the local file a ``file:`` URL names, else None (another scheme).

    ``file:///abs/path`` is that path. ``file:relative/path`` is the project directory's
    (``project``; default: the current directory, which is Snakemake's ``-d``/``--directory``
    and every job's working directory) if the file is there, else the workflow's (``workflow_dir``;
    default: ``default_workflow_dir()``) if it is there, else the project's (the reader's error names it).
    So the bundled ``file:assets/...`` sample works from a project directory elsewhere. The one
    parser of ``file:`` URLs: the config checks, the download stage and the containers' mounts.
    Raises PipelineError for a URL that names a host or no path."""
    found = locate_file_url(url, project, workflow_dir)
    return found.path if found else None


WORKFLOW_DIR_ENV = "LLAMAPIPE_WORKFLOW_DIR"  # the checkout holding the Snakefile (common.smk sets it)


def default_workflow_dir() -> str | None:
    """The workflow's directory, where a relative ``file:`` path not in the project is looked for:
    ``$LLAMAPIPE_WORKFLOW_DIR`` (Snakemake's ``workflow.basedir``, exported by common.smk to the
    checks and the jobs), else the checkout this package is installed from when it is one (``pip
    install -e .``, as `make setup` does: for ``llamapipe serve``/``chat`` and a workflow that
    does not export it), else None."""
    given = os.environ.get(WORKFLOW_DIR_ENV)
    if given:
        return os.path.abspath(given)
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return checkout if os.path.isfile(os.path.join(checkout, "Snakefile")) else None


class LocalFile:
    """Where a ``file:`` URL's file is (``locate_file_url``): ``path`` (absolute), ``base``
    (``absolute``, ``project`` or ``workflow``: which directory a relative path was found in, or
    ``project`` when it is in neither), ``tried`` (the absolute paths looked at, in order)."""

    __slots__ = ("url", "path", "base", "project", "workflow_dir", "tried")

    def __init__(self, url: str, path: str, base: str, project: str, workflow_dir: str | None,
                 tried: tuple[str, ...]):
        self.url, self.path, self.base = url, path, base
        self.project, self.workflow_dir, self.tried = project, workflow_dir, tried

    def __repr__(self) -> str:
        return f"LocalFile({self.url!r}, {self.path!r}, base={self.base!r})"

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def where(self) -> str:
        """Which directory the path is from, for a log line or a message."""
        if self.base == "absolute":
            return "an absolute path"
        if self.base == "workflow":
            return (f"not in the project directory {self.project}; found in the workflow's directory "
                    f"{self.workflow_dir}")
        return f"in the project directory {self.project}"

    def missing(self) -> str:
        """``no such file <path>`` naming every place a relative path was looked for."""
        also = "".join(f", nor {p}" for p in self.tried[1:])
        why = "" if self.base == "absolute" else (
            " (a relative path is the project directory's or, if not there, the workflow's)" if also
            else " (a relative path is relative to the project directory)")
        return f"no such file {self.path}{also}{why}"


def locate_file_url(url: str, project: str | None = None, workflow_dir: str | None = None) -> LocalFile | None:
    """``file_url_path`` with where the file was found (None: not a ``file:`` URL)."""
    from llamapipe.core.errors import PipelineError

    parsed = urlparse(url)
    if parsed.scheme.lower() != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise PipelineError(f"file url {url!r} names host {parsed.netloc!r}; "
                            "use file:///absolute/path or file:relative/path")
    given = unquote(parsed.path)
    if not given:
        raise PipelineError(f"file url {url!r} has no path")
    project = os.path.abspath(project or os.getcwd())
    base = os.path.abspath(workflow_dir) if workflow_dir else default_workflow_dir()
    if os.path.isabs(given):
        path = os.path.normpath(given)
        return LocalFile(url, path, "absolute", project, base, (path,))
    tried = [os.path.normpath(os.path.join(project, given))]
    if base and base != project:
        tried.append(os.path.normpath(os.path.join(base, given)))
    if len(tried) > 1 and not os.path.exists(tried[0]) and os.path.exists(tried[1]):
        return LocalFile(url, tried[1], "workflow", project, base, tuple(tried))
    return LocalFile(url, tried[0], "project", project, base, tuple(tried))


def user_paths(stage: str, cfg: dict, project: str) -> list[str]:
    """Host paths outside the project that a stage reads: the container of that stage gets each
    read-only at the same path (the project itself is mounted whole)."""
    project = os.path.abspath(project)
    wanted: list[str | None] = []
    if stage == "download_data":
        local = file_url_path(cfg["data"]["url"])
        wanted.append(os.path.join(project, local) if local else None)
    if stage in ("sft", "merge"):
        wanted.append(local_model_dir(cfg, project))
    if stage == "sft" and cfg["target"] == "npu" and cfg["npu"]["pretrain"]["enabled"]:
        wanted.append(os.path.join(project, cfg["npu"]["pretrain"]["input_dir"]))
    outside = [os.path.normpath(p) for p in wanted if p]
    return sorted({p for p in outside if not (p + os.sep).startswith(project.rstrip(os.sep) + os.sep)})
