"""The NPU target rehearsed on CPU: the one list of what differs from a real NPU run.

``--config target=npu rehearsal=cpu`` runs the NPU DAG (preflight, plan, build_ops, init_model,
smoke_collective, sft, merge, export, predict, evaluate, report) through the same command builders
(``llamapipe.runners.commands``, ``llamapipe.npu.upstream_args``) and upstream's own ``llm/`` entry points
from a PaddleNLP checkout, on this machine's CPU, with the cpu target's tiny LLaMA standing in
for llama2-13b. Every difference from the NPU run is a config value set here, with its reason;
the command builders have no rehearsal branch, so the NPU dry-run's commands with these values
substituted are the rehearsal's commands (``tests/test_rehearsal.py`` checks it flag by flag).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from llamapipe.config.paths import PATHS, local_model_dir
from llamapipe.core.errors import PipelineError
from llamapipe.npu.checkout import CHECKOUT_ENV, missing_files

PARALLEL_ONE_PROCESS = {
    "tensor_parallel_degree": 1,
    "pipeline_parallel_degree": 1,
    "sharding_parallel_degree": 1,
    "sharding": "",
    "sharding_parallel_config": "",
    "sequence_parallel": False,
    "recompute": False,
}


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path in the resolved config
    value: Any
    reason: str
    runtime: str = "any"  # "local" or "container": only on that runtime


def _differences(cfg: dict) -> list[Difference]:
    model_shape = dict(cfg["model"], model_type="llama")
    # the user's own weights (a directory, e.g. a small model to rehearse with) are rehearsed as given
    own_model = local_model_dir(cfg, os.getcwd()) not in (None, os.path.abspath(PATHS["base_model"]))
    return [
        Difference("npu.device", "cpu", "no Ascend cards: upstream scripts get --device cpu; the launcher "
                   "starts --nproc_per_node processes (a CPU build has no device labels for --devices), and "
                   "containers get no /dev/davinci* nodes or driver mounts; preflight's host checks (chip, "
                   "driver, npu-smi ...) and preflight_image's /dev/shm check do not run"),
        Difference("devices", "0", "one process stands in for the cards"),
        Difference("npu.smoke_devices", "0,1", "smoke_collective starts two processes (gloo, about 10 s), "
                   "not sft's one: with one process its all-reduce sums nothing across ranks"),
        Difference("npu.parallel", PARALLEL_ONE_PROCESS, "one process: no tensor/pipeline/sharding groups, "
                   "so no sequence parallel and no sharding stage"),
    ] + ([] if own_model else [
        Difference("npu.model_name_or_path", PATHS["base_model"], "the cpu target's tiny LLaMA (built by init_model) "
                   "stands in for meta-llama/Llama-2-13b: no hub downloads here (a local model directory the "
                   "user gives is kept)"),
        Difference("npu.model_config", json.dumps(model_shape, sort_keys=True),
                   "the parallel plan checks the tiny model's shape"),
    ]) + [
        Difference("npu.sft", {}, "sizes and schedule of the cpu target's sft section (float32, src_length/"
                   "max_length within the tiny model's positions, minutes on 2 cores) instead of npu.sft"),
        Difference("npu.export", {}, "the cpu target's export section (float32, its decode length)"),
        Difference("npu.predict", {}, "the cpu target's predict section (batch, decode length)"),
        Difference("npu.data", {}, "the cpu target's data section: the bundled sample (pinned), not the guide's "
                   "AdvertiseGen archive (no download from bj.bcebos.com; minutes, not hours, of training)"),
        Difference("npu.fused.fp16_opt_level", "O1", "float32 training: run_finetune.py raises 'Please "
                   "specific dtype: --fp16 or --bf16' with O2 and neither"),
        Difference("npu.fused.use_flash_attention", False, "no CPU kernel for flash attention"),
        Difference("npu.fused.use_fused_rms_norm", False, "no CPU kernel for fused rms_norm"),
        Difference("npu.fused.pad_to_multiple_of", 16, "4096 pads every tiny example to 4096 tokens "
                   "(87 s a step on 2 cores)"),
        Difference("npu.inference_model", False, "--inference_model --block_attn need paddlenlp_ops' NPU "
                   "kernels (paddle_custom_device.npu.ops): export/predict run upstream's plain static "
                   "model; the ops wheel is built and installed but not imported"),
        Difference("npu.ascend_env", False, "no CANN/ATB on CPU: set_env.sh scripts are not sourced, and "
                   "preflight_image records its toolkit, kernels, atb_env and plugin_ldd checks (and the "
                   "paddle-custom-npu version) as 'skipped: rehearsal'; its import gate, numpy and paddlepaddle "
                   "version checks run"),
        Difference("npu.cpu_shims", True, "upstream scripts run through llamapipe.npu.cpu_shims: export with "
                   "use_top_p=False (top_p_sampling has no float32 CPU kernel) and the predictor without "
                   "Paddle Inference's inplace_pass (with oneDNN it corrupts the decode loop on CPU)"),
        Difference("npu.image.build", False, "no NPU image is pulled or built (pull_image, build_image "
                   "are not in the DAG)"),
        Difference("runtime", "local", "stages run as local processes (runtime=container: in the CPU stage "
                   "image)", runtime="local"),
        Difference("npu.paddlenlp_dir", None, "the checkout given by LLAMAPIPE_PADDLENLP_SRC / paddlenlp_src "
                   "(else a clone of the pinned commit in .cache/) instead of the image's /opt/PaddleNLP",
                   runtime="local"),
        Difference("npu.image.tag", cfg["container"]["image"], "the CPU stage image (container.image) "
                   "instead of the built NPU image", runtime="container"),
        Difference("npu.paddlenlp_mount", None, "the given checkout, mounted read-only at npu.paddlenlp_dir, "
                   "instead of the image's own", runtime="container"),
        Difference("npu.network", cfg["container"]["network"], "the CPU stage image's network setting",
                   runtime="container"),
        Difference("npu.env.GLOO_SOCKET_IFNAME", "lo", "gloo, the CPU stand-in for HCCL in smoke_collective, "
                   "binds to the loopback: without a network the container's hostname does not resolve",
                   runtime="container"),
    ] + ([Difference("npu.node_launcher", "local", "no SLURM allocation: the npu.nodes launchers all start on "
                     "this host (llamapipe.scaleout.local_nodes) and meet at npu.master on 127.0.0.1, where srun would "
                     "start one per node of the job")]
         if (cfg.get("npu") or {}).get("nodes", 1) > 1 else [])


def given_checkout(cfg: dict) -> str | None:
    """A checkout named by config ``paddlenlp_src`` or the environment, if any."""
    return cfg.get("paddlenlp_src") or os.environ.get(CHECKOUT_ENV) or None


def clone_dir(cfg: dict) -> str:
    """Where the rehearsal clones the pinned commit when no checkout is given (project-relative)."""
    return f".cache/PaddleNLP-{cfg['npu']['image']['paddlenlp_commit']}"


def checkout_dir(cfg: dict) -> str:
    """The PaddleNLP checkout the rehearsal runs: the one given (checked here), else the clone
    the paddlenlp_checkout rule makes."""
    path = given_checkout(cfg)
    if not path:
        return os.path.abspath(clone_dir(cfg))
    path = os.path.abspath(path)
    missing = missing_files(path)
    if missing:
        raise PipelineError(f"{path} is not a PaddleNLP checkout the NPU stages can run: missing {', '.join(missing)}")
    return path


def host_checkout(cfg: dict) -> str | None:
    """A given PaddleNLP checkout on the host, for preflight to check: mounted into the
    containers, or run in place by the local rehearsal. The image's own is not on the host; the
    rehearsal's clone is checked as it is made."""
    if cfg.get("rehearsal") and not given_checkout(cfg):
        return None
    local = cfg["npu"]["paddlenlp_dir"] if cfg.get("rehearsal") and cfg["runtime"] == "local" else None
    return cfg["npu"]["paddlenlp_mount"] or local


def _applicable(cfg: dict) -> list[Difference]:
    """The differences for this config's runtime."""
    runtime = cfg.get("runtime", "local")
    return [d for d in _differences(cfg) if d.runtime in ("any", runtime)]


def apply(cfg: dict) -> dict:
    """Set every difference in ``cfg`` (before the npu overlays and the plan are applied)."""
    for d in _applicable(cfg):
        checkout = d.key in ("npu.paddlenlp_dir", "npu.paddlenlp_mount")
        _set(cfg, d.key, checkout_dir(cfg) if checkout else d.value)
    return cfg


def describe(cfg: dict) -> list[dict]:
    """The list as recorded in provenance and printed by the dry-run, from a resolved config
    (the values as applied)."""
    return [{"key": d.key, "value": _get(cfg, d.key), "reason": d.reason} for d in _applicable(cfg)]


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for name in dotted.split("."):
        node = node[name]
    return node


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
