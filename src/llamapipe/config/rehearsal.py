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
import math
import os
from dataclasses import dataclass
from typing import Any

from llamapipe.config.parallel import AUTO_DEFAULTS, DEGREE_KEYS
from llamapipe.config.paths import PATHS, local_model_dir
from llamapipe.core.errors import PipelineError
from llamapipe.npu.checkout import CHECKOUT_ENV, missing_files

REHEARSAL_PARALLEL = dict(AUTO_DEFAULTS, tensor_parallel_degree=2, pipeline_parallel_degree=1,
                          sharding_parallel_degree=1)
"""The guide's layout (llama_npu_sft_N1C8.sh: tensor parallel 8, sharding stage1 with tensor fusion
and overlap, sequence parallel) shrunk to two CPU processes: tensor parallel 2."""

CPU_SHIMS = {  # llamapipe.npu.cpu_shims: the Paddle call each one replaces, and why
    "c_identity": "paddle._C_ops.c_identity (tensor parallel's column-parallel input): no CPU kernel in Paddle "
                  "3.0.0 ('Do not support c_identity for cpu kernel now'); forward it is a copy, so the input "
                  "itself (the all-reduce of its gradient, mp_ops.c_identity_eager.backward, still runs)",
    "c_concat": "paddle._C_ops.c_concat (the LM head's gather of vocabulary shards, parallel_matmul): no CPU "
                "kernel; an all_gather over the ring's gloo group, concatenated, with c_concat's gradient",
    "c_softmax_with_cross_entropy": "paddle._C_ops.c_softmax_with_cross_entropy (--tensor_parallel_output true: "
                                    "the vocabulary-parallel loss): no CPU kernel; the shards gathered as c_concat "
                                    "and the plain cross entropy of the whole row (same loss and shard gradients)",
    "gloo_calc_stream": "ProcessGroupGloo.<collective>_on_calc_stream (all_reduce, all_gather_into_tensor, "
                        "broadcast, reduce, reduce_scatter_tensor, send, recv): gloo refuses the calc-stream "
                        "variants ('ProcessGroupGLOO does not support all_reduce with sync_op and use_calc_stream "
                        "flag'); a CPU process has one stream: the synchronous collective",
    "gloo_reduce_scatter": "ProcessGroupGloo.reduce_scatter_tensor (sequence parallel's row-parallel linears, "
                           "sharding's gradient fusion): gloo has no reduce_scatter; an all_reduce and the rank's "
                           "slice (same result, twice the traffic)",
    "broadcast_input_data": "fleet.utils.hybrid_parallel_util.broadcast_input_data (the tensor-parallel wrapper's "
                            "_pre_forward): asserts 'Only support xpu, gpu and custom_device now, but this is cpu'; "
                            "the same broadcasts from the model-parallel group's first rank, on CPUPlace",
    "tensor_fusion_cpu": "fleet.utils.tensor_fusion_helper.get_current_device_type (sharding stage1's "
                         "enable_stage1_tensor_fusion with 2+ sharding ranks): asserts 'only support gpu, npu, xpu'; "
                         "CPU gets the NPU's 256-byte buffer alignment",
    "param_storage_cpu": "group_sharded_storage.ParamStorage.add_rank_params(convert_gpu=True) (the same fusion): "
                         "copies each parameter to host with param.cpu(), clears it, moves the buffer to the device "
                         "(cvt_to_device raises on a CPU build); on CPU param.cpu() is the parameter itself, so the "
                         "clear zeroes the model (loss stuck at ln(vocab)): convert_gpu=False on CPU",
    "parallel_env_device_id": "paddle.distributed.ParallelEnv.device_id (read by PipelineLayer, "
                              "pipeline_parallel_degree > 1): a CPU build never sets _device_id (AttributeError); "
                              "a CPU process is device 0",
    "export_without_top_p": "paddlenlp.generation.GenerationMixin.to_static (export; the one stand-in outside "
                            "Paddle, kept from before the tensor-parallel rehearsal): traces "
                            "paddle.tensor.top_p_sampling, which has no float32 CPU kernel ('Check data type "
                            "error for op: top_p_sampling'); "
                            "exports with use_top_p=False (the predictor's greedy_search uses greedy/top-k only)",
    "predictor_without_inplace_pass": "paddle.inference.create_predictor (predict): Paddle Inference's PIR "
                                      "inplace_pass with oneDNN corrupts the exported decode loop on CPU (tokens "
                                      "after the first differ from dygraph); the predictor runs without that pass",
}


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path in the resolved config
    value: Any
    reason: str
    runtime: str = "any"  # "local" or "container": only on that runtime


REHEARSAL_SCHEDULE = {"max_steps": 300, "warmup_steps": 30}
"""Shorter than the cpu target's 1000 steps: a tensor-parallel step with sequence parallel costs
about 0.5 s on 2 cores (gloo collectives on the loopback, ~5 ms each), one process's 0.2 s."""


def _schedule(cfg: dict, shipped: dict | None) -> dict:
    """:data:`REHEARSAL_SCHEDULE`, but for the keys the user set in ``sft`` (those that differ from
    config.yaml's, ``shipped``): theirs are kept."""
    given, ours = cfg.get("sft") or {}, (shipped or {}).get("sft") or {}
    return {k: v for k, v in REHEARSAL_SCHEDULE.items() if not shipped or given.get(k) == ours.get(k)}


def _differences(cfg: dict, shipped: dict | None = None) -> list[Difference]:
    model_shape = dict(cfg["model"], model_type="llama")
    # the user's own weights (a directory, e.g. a small model to rehearse with) are rehearsed as given
    own_model = local_model_dir(cfg, os.getcwd()) not in (None, os.path.abspath(PATHS["base_model"]))
    return [
        Difference("npu.device", "cpu", "no Ascend cards: upstream scripts get --device cpu; the launcher "
                   "starts --nproc_per_node processes (a CPU build has no device labels for --devices), and "
                   "containers get no /dev/davinci* nodes or driver mounts; preflight's host checks (chip, "
                   "driver, npu-smi ...) and preflight_image's /dev/shm check do not run"),
        *_layout(cfg),
    ] + ([] if own_model else [
        Difference("npu.model_name_or_path", PATHS["base_model"], "the cpu target's tiny LLaMA (built by init_model) "
                   "stands in for meta-llama/Llama-2-13b: no hub downloads here (a local model directory the "
                   "user gives is kept)"),
        Difference("npu.model_config", json.dumps(model_shape, sort_keys=True),
                   "the parallel plan checks the tiny model's shape"),
    ]) + [
        Difference("npu.sft", _schedule(cfg, shipped), "sizes and schedule of the cpu target's sft section (float32, "
                   "src_length/max_length within the tiny model's positions) instead of npu.sft, with 300 steps "
                   "(warmup 30) unless sft.max_steps / sft.warmup_steps are given: a tensor-parallel step costs "
                   "~0.5 s on 2 cores"),
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
        *[Difference(f"npu.cpu_shims.{name}", True, reason) for name, reason in CPU_SHIMS.items()],
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


def _layout(cfg: dict) -> list[Difference]:
    """The parallel layout and the processes that run it: ``npu.parallel`` a mapping is the user's
    (config.yaml's is ``auto``) and is rehearsed as pinned, one process per rank; else the guide's
    layout at tensor parallel 2 (:data:`REHEARSAL_PARALLEL`)."""
    pinned = cfg["npu"]["parallel"]
    layout = dict(AUTO_DEFAULTS, **pinned) if isinstance(pinned, dict) else REHEARSAL_PARALLEL
    ranks = math.prod(int(layout[key]) for key in DEGREE_KEYS)
    found = [
        Difference("npu.parallel", layout, "npu.parallel as pinned (command line or config file), else the "
                   "guide's layout shrunk to two processes: tensor parallel 2 (the guide: 8), sharding stage1 with "
                   "tensor fusion and overlap, sequence parallel ('npu={parallel: {tensor_parallel_degree: 1, "
                   "sequence_parallel: false}}': the one-process rehearsal)"),
        Difference("devices", ",".join(str(i) for i in range(ranks)), "one CPU process per rank of the layout "
                   "stands in for the cards"),
    ]
    if ranks > 1:  # Snakemake exports the rule's threads as both to every rank
        why = ("one CPU thread per process: with the rule's 2 threads in each of 2 ranks on 2 cores a tensor-parallel "
               "step takes 0.87 s (MKL 2 threads) or 0.92 s (OpenMP 2 threads) against 0.48 s (40 steps, measured)")
        found += [Difference("npu.env.OMP_NUM_THREADS", "1", why), Difference("npu.env.MKL_NUM_THREADS", "1", why)]
    if ranks == 1:
        found.append(Difference("npu.smoke_devices", "0,1", "smoke_collective starts two processes (gloo, about 10 "
                                "s), not sft's one: with one process its all-reduce sums nothing across ranks"))
    return found


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


def _applicable(cfg: dict, shipped: dict | None = None) -> list[Difference]:
    """The differences for this config's runtime."""
    runtime = cfg.get("runtime", "local")
    return [d for d in _differences(cfg, shipped) if d.runtime in ("any", runtime)]


def apply(cfg: dict, shipped: dict | None = None) -> dict:
    """Set every difference in ``cfg`` (before the npu overlays and the plan are applied).
    ``shipped``: config.yaml's values (None: the user changed no sft key)."""
    for d in _applicable(cfg, shipped):
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
