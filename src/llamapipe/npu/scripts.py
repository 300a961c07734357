"""What runs on the npu target: the ``bash -c`` script of each stage, inside the stage image.

Each script sources the Ascend environment, runs upstream's ``llm/`` entry point from the pinned
checkout with the arguments of ``llamapipe.npu.upstream_args``, then our check or collector
(an upstream step may exit 0 having written nothing). Where the script runs (a container, the
rehearsal's local process, srun on every node) is ``llamapipe.runners.commands``' business; this
module returns argv lists and imports no Paddle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any, Callable

from llamapipe.config.paths import local_model_dir
from llamapipe.core import checkpoint_io
from llamapipe.core.cards import parse_cards
from llamapipe.entrypoints import CPU_SHIMS_SCRIPT, SERVE_SCRIPT, SMOKE_SCRIPT, package_src_dir
from llamapipe.npu import upstream_args
from llamapipe.scaleout import launch
from llamapipe.scaleout.launch import LaunchLayout


def bash_script(cfg: dict, lines: list[str], atb: bool = False) -> list[str]:
    """bash -c script: Ascend env, then the commands, from the checkout's llm/ directory.

    PYTHONPATH: the checkout (``from llm.predict.predictor import``), ``llm/`` (``from utils...``)
    and ``llm/devices/`` (export on npu: ``from npu.llama.export_utils import``; upstream's own
    export_npu.sh misses it since the module moved there)."""
    npu = cfg["npu"]
    root, pdnlp = npu["ascend_root"], npu["paddlenlp_dir"]
    prelude = ["set -eo pipefail"]
    if npu["ascend_env"]:
        prelude += [f"source {root}/{s}" for s in upstream_args.ASCEND_ENV_SCRIPTS]
        if atb:
            found = " ".join(f"{root}/{s}" for s in upstream_args.ATB_ENV_SCRIPTS)
            prelude += [f"atb=$(ls {found} 2>/dev/null | head -n 1)",
                        f'[ -n "$atb" ] || (echo "no ATB set_env.sh under {root} (atb/ or nnal/atb/)" >&2 && false)',
                        'source "$atb"']
    prelude += [f"export PYTHONPATH={pdnlp}:{pdnlp}/llm:{pdnlp}/llm/devices${{PYTHONPATH:+:$PYTHONPATH}}",
                f"cd {pdnlp}/llm"]
    # set -e: the first failing step fails the rule. No step holds "; " (tests split on it).
    return ["bash", "-c", "; ".join(prelude + lines)]


def _abs(project: str, path: str) -> str:
    return os.path.join(project, path)


def _model(cfg: dict, paths: dict, project: str) -> str:
    """The base model upstream loads: a hub name as is; a directory (the one init_model built, or
    the user's own weights) as an absolute path, since the scripts run from the checkout's llm/."""
    return local_model_dir(cfg, project) or cfg["npu"]["model_name_or_path"]


def _shims(cfg: dict) -> list[str]:
    """``--shims=...``: the rehearsal's CPU stand-ins (``npu.cpu_shims``), none on the cards."""
    names = [name for name, on in cfg["npu"]["cpu_shims"].items() if on]
    return [f"--shims={','.join(names)}"] if names else []


def _python(cfg: dict) -> list[str]:
    """How upstream scripts are started (the rehearsal: through llamapipe.npu.cpu_shims)."""
    shims = _shims(cfg)
    return ["python", "-m", "llamapipe.npu.cpu_shims", *shims] if shims else ["python"]


def _launched(cfg: dict, script: str) -> list[str]:
    """What the launcher starts in each process: upstream's script (the rehearsal: through the
    CPU shims, as a script path since the launcher cannot start a module)."""
    shims = _shims(cfg)
    return [os.path.join(package_src_dir(), CPU_SHIMS_SCRIPT), *shims, script] if shims else [script]


def _ops_install(cfg: dict, paths: dict, project: str) -> list[str]:
    """paddlenlp_ops into a private directory, not site-packages (the container runs as the
    caller, who cannot write there; on the host it would change the venv). The import gate turns
    upstream's "paddlenlp_ops does not exist" (exit 0, nothing written) into a failure."""
    wheels = shlex.quote(_abs(project, paths["wheels"]))
    lines = ["ops=$(mktemp -d)",
             f"python -m pip install --quiet --no-deps --no-index --no-cache-dir --target $ops {wheels}/*.whl",
             "export PYTHONPATH=$ops:$PYTHONPATH"]
    if cfg["npu"]["inference_model"]:
        lines.append('python -c "import paddlenlp_ops"')
    return lines


def _check(kind: str, path: str) -> str:
    """Our check that an upstream step wrote what it should (exit 0 alone proves nothing)."""
    return shlex.join(["python", "-m", "llamapipe", "check-outputs", "--kind", kind, "--path", path])


def training_env(cfg: dict) -> list[str]:
    """The exports of sft's script (smoke_collective's too: the same environment)."""
    # npu.env in the script, as upstream's training scripts export it (its export/predict scripts
    # set none of it), so the rehearsal's local runtime runs with it too
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(cfg["npu"]["env"].items())]
    # upstream's checkpoint integrity: `.checkpoint_done` last in each checkpoint, and a rerun
    # resumes from the newest complete one (a kill during a save must not poison the resume)
    resume = [f"export {k}={v}" for k, v in checkpoint_io.COMPLETE_CHECKPOINTS_ENV.items()]
    return exports + resume


def sft_script(cfg: dict, paths: dict, project: str, layout: LaunchLayout) -> list[str]:
    """Upstream's training script under the launcher (one node, or the local stand-in for N:
    ``llamapipe.scaleout.local_nodes``), then collect-sft; with srun, the per-node part alone
    (collect-sft then runs once after srun: ``collect_sft_script``).

    Before the launcher, ``prepare_sft`` (``llamapipe.stages.collect``): upstream's script resumes
    from its output_dir by itself, so a finished run's checkpoints are moved aside there (asking
    for sft again trains from scratch; a crashed run resumes), and the plan line it logs lets the
    rule's terminal filter show upstream's loss lines as progress (with srun it runs once before srun:
    ``prepare_sft_script``). NO_COLOR: upstream's colorlog
    writes no colour codes into the worker and rule logs."""
    out = _abs(project, paths["sft_checkpoints"])
    model = _model(cfg, paths, project)
    if cfg["npu"]["pretrain"]["enabled"]:
        input_dir = _abs(project, cfg["npu"]["pretrain"]["input_dir"])  # the project's, not llm/'s
        cache = _abs(project, paths["pretrain_data_cache"])  # upstream's ./data_cache: inside the checkout
        script, args = "run_pretrain.py", upstream_args.pretrain_args(cfg, model, input_dir, out, cache)
    else:
        script, args = "run_finetune.py", upstream_args.finetune_args(cfg, model, _abs(project, paths["data"]), out)
    argv_launch = launch.launch_argv(layout, _launched(cfg, script), _abs(project, paths["sft_launch_logs"])) + args
    plain = ["export NO_COLOR=1"]
    if launch.by_srun(layout):
        return bash_script(cfg, [*training_env(cfg), *plain, launch.shell_line(argv_launch)])
    run = launch.node_command(layout, argv_launch)
    after = [*_merge_pipeline_stages(cfg, paths, project), _collect_sft(cfg, paths, project)]
    return bash_script(cfg, [*training_env(cfg), *plain, shlex.join(_prepare_sft(cfg, paths, project, script)),
                             shlex.join(run), *[shlex.join(step) for step in after]])


def prepare_sft_script(cfg: dict, paths: dict, project: str) -> list[str]:
    """With srun: the prepare step runs once, before srun starts the launchers on every node."""
    script = "run_pretrain.py" if cfg["npu"]["pretrain"]["enabled"] else "run_finetune.py"
    return bash_script(cfg, [shlex.join(_prepare_sft(cfg, paths, project, script))])


def _prepare_sft(cfg: dict, paths: dict, project: str, script: str) -> list[str]:
    # --script=NAME, one token: the upstream script's name alone marks the step that runs it
    return ["python", "-m", "llamapipe.stages.collect", "prepare-sft", "--ckpt-dir",
            _abs(project, paths["sft_checkpoints"]), "--max-steps", str(cfg["sft"]["max_steps"]), f"--script={script}"]


def _merge_pipeline_stages(cfg: dict, paths: dict, project: str) -> list[list[str]]:
    """With pipeline parallel, upstream's final save is one file per stage
    (``model_state.pp0N.pdparams``, ``model_state.tp0M_pp0N.pdparams`` with tensor parallel too),
    which no later stage loads: upstream's ``tools/merge_tp_and_pp_params.py`` joins them into
    ``model_state.pdparams`` in place. Its ``--tensor_parallel_degree 0`` is how it names "pp
    files without a tp part" (with 1 it looks for ``tp00_pp0N``). Full fine-tuning only: the tool
    knows no LoRA files."""
    par = cfg["npu"]["parallel"]
    if par["pipeline_parallel_degree"] <= 1 or cfg["sft"]["lora"] or cfg["npu"]["pretrain"]["enabled"]:
        return []
    tp = par["tensor_parallel_degree"]
    return [_python(cfg) + ["tools/merge_tp_and_pp_params.py", "--model_name_or_path",
                            _abs(project, paths["sft_checkpoints"]), "--device", cfg["npu"]["device"],
                            "--pipeline_parallel_degree", str(par["pipeline_parallel_degree"]),
                            "--tensor_parallel_degree", str(tp if tp > 1 else 0)]]


def _collect_sft(cfg: dict, paths: dict, project: str) -> list[str]:
    return ["python", "-m", "llamapipe", "collect-sft", "--ckpt-dir", _abs(project, paths["sft_checkpoints"]),
            "--launch-logs", _abs(project, paths["sft_launch_logs"]), "--out", _abs(project, paths["sft"]),
            "--save-total-limit", str(cfg["sft"]["save_total_limit"])]


def collect_sft_script(cfg: dict, paths: dict, project: str) -> list[str]:
    steps = [*_merge_pipeline_stages(cfg, paths, project), _collect_sft(cfg, paths, project)]
    return bash_script(cfg, [shlex.join(step) for step in steps])


def smoke_collective_script(cfg: dict, paths: dict, project: str, layout: LaunchLayout) -> list[str]:
    """An all-reduce and a matmul on every card sft uses, before sft: sft's script prelude and
    exports, its launcher (the same flags but --log_dir), under ``npu.smoke_timeout_s``
    (``llamapipe.scaleout.collective_check`` names the ranks that did not report)."""
    npu = cfg["npu"]
    cards = npu.get("smoke_devices") or cfg["devices"]  # smoke_devices: the rehearsal's two processes
    logs = _abs(project, paths["smoke_launch_logs"])
    reports = os.path.join(logs, "ranks")
    script = os.path.join(package_src_dir(), SMOKE_SCRIPT)
    # one node's cards (several nodes: the node that runs the job), as sft's launcher starts them
    one_node = dataclasses.replace(layout, procs=len(parse_cards(cards)), nodes=1, node_launcher="local")
    launch_cmd = launch.launch_argv(one_node, [script], logs)
    check = ["python", "-m", "llamapipe.scaleout.collective_check", "--timeout", str(npu["smoke_timeout_s"]),
             "--cards", cards, "--reports", reports, "--launch-logs", logs,
             "--out", _abs(project, paths["smoke_collective"]), "--"]
    return bash_script(cfg, [*training_env(cfg), shlex.join([*check, *launch_cmd, "--reports", reports])])


def _merge(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Full SFT: our merge (one pdparams, config fix-up). LoRA: upstream's merge_lora_params.py
    first, then the same merge of its output."""
    if not cfg["sft"]["lora"]:
        return _own_stage(cfg, paths, project, argv)
    folded = _abs(project, paths["merged"]) + ".lora"
    merge_lora = _python(cfg) + ["tools/merge_lora_params.py", *upstream_args.merge_lora_args(
        cfg, _model(cfg, paths, project), _abs(project, paths["sft"]), folded)]
    ours = list(argv[1:])
    ours[ours.index("--sft") + 1] = folded
    return bash_script(cfg, [f"rm -rf {shlex.quote(folded)}", shlex.join(merge_lora), _check("model", folded),
                             f"cd {shlex.quote(project)}", shlex.join(["python", "-m", "llamapipe", *ours]),
                             f"rm -rf {shlex.quote(folded)}"])


def _export(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    final = _abs(project, paths["inference"])
    tmp = final + ".tmp"
    export = _python(cfg) + ["predict/export_model.py",
                             *upstream_args.export_args(cfg, _abs(project, paths["merged"]), tmp)]
    return bash_script(cfg, [*_ops_install(cfg, paths, project), f"rm -rf {shlex.quote(tmp)}", shlex.join(export),
                             _check("export", tmp), f"mv {shlex.quote(tmp)} {shlex.quote(final)}"], atb=True)


def _predict(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    raw = _abs(project, paths["predictions"]) + ".upstream.jsonl"
    predict = _python(cfg) + ["predict/predictor.py", *upstream_args.predictor_args(
        cfg, _abs(project, paths["inference"]), _abs(project, paths["dev"]), raw)]
    collect = ["python", "-m", "llamapipe", "collect-predictions", "--upstream", raw,
               "--dev", _abs(project, paths["dev"]), "--out", _abs(project, paths["predictions"])]
    return bash_script(cfg, [*_ops_install(cfg, paths, project), f"rm -f {shlex.quote(raw)}", shlex.join(predict),
                             shlex.join(collect)], atb=True)


def _own_stage(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Stages that are our own code on both targets, inside the NPU image (Ascend env for paddle)."""
    return bash_script(cfg, [f"cd {shlex.quote(project)}", shlex.join(["python", "-m", "llamapipe", *argv[1:]])])


# stage -> its script from our CLI call (``argv``: ``llamapipe <stage> ...``); sft: ``sft_script``
STAGE_SCRIPTS: dict[str, Callable[[dict, dict, str, list[str]], list[str]]] = {
    "export": _export,
    "predict": _predict,
    "merge": _merge,
    "init_model": _own_stage,
    "download_data": _own_stage,
    "prepare_data": _own_stage,
    "evaluate": _own_stage,
}


def preflight_image_script(cfg: dict, paths: dict, project: str) -> list[str]:
    """Rule preflight_image: ``llamapipe preflight-image`` (``llamapipe.stages.preflight_image``)
    through the stages' own CANN prelude; ATB's set_env.sh is sourced by the checks themselves
    (as export/predict source it), so its absence is reported with everything else."""
    npu = cfg["npu"]
    params: dict[str, Any] = {
        "ascend_root": npu["ascend_root"], "env_scripts": list(upstream_args.ASCEND_ENV_SCRIPTS),
        "atb_scripts": list(upstream_args.ATB_ENV_SCRIPTS), "ascend_env": npu["ascend_env"],
        "device": npu["device"], "pairing": npu["pairing"], "shm_size": npu["shm_size"],
        "inference_model": npu["inference_model"], "wheels": _abs(project, paths["wheels"])}
    check = ["python", "-m", "llamapipe", "preflight-image", "--params", json.dumps(params, sort_keys=True),
             "--out", _abs(project, paths["image_preflight"])]
    return bash_script(cfg, [f"cd {shlex.quote(project)}", shlex.join(check)])


def build_ops_script(cfg: dict, paths: dict, project: str) -> list[str]:
    """The guide's step 6 (``cd csrc/npu; python setup.py build bdist_wheel``), in a copy of
    ``csrc/npu``: the checkout is root-owned in the image (read-only in the rehearsal)."""
    pdnlp, wheels = cfg["npu"]["paddlenlp_dir"], _abs(project, paths["wheels"])
    tmp = wheels + ".tmp"
    return bash_script(cfg, [
        f"rm -rf {shlex.quote(tmp)}", f"mkdir -p {shlex.quote(tmp)}", "build=$(mktemp -d)",
        f"cp -r {pdnlp}/csrc/npu/. $build/", "cd $build", "python setup.py build bdist_wheel",
        f"cp dist/paddlenlp_ops-*.whl {shlex.quote(tmp)}/", _check("wheels", tmp),
        f"mv {shlex.quote(tmp)} {shlex.quote(wheels)}",
    ])


# ``llamapipe serve`` on target npu (no rule: ``llamapipe.npu.serve_script`` places it as predict is placed)
SERVE_MODULE = "llamapipe.serving.server"


def serve_script(cfg: dict, paths: dict, project: str, server_argv: list[str]) -> list[str]:
    """Our server with upstream's predictor as its engine: predict's script (``_predict``: Ascend
    and ATB env, the ops wheel and its import gate, the checkout's ``llm/`` as working directory
    and on PYTHONPATH) with ``python -m llamapipe.serving.server --engine upstream <server_argv> --
    <predictor flags>`` in place of predictor.py and its collector. The predictor flags are the
    predict rule's (``upstream_args.serving_predictor_args``); on the rehearsal the server starts
    through the CPU shims exactly as predictor.py does (``_python``; as a script path, since
    ``cpu_shims`` starts a script). ``exec``: the server replaces the script's shell, so a SIGTERM
    to the script (``docker stop``: PID 1; the rehearsal's local process) reaches the server itself."""
    predictor = upstream_args.serving_predictor_args(cfg, _abs(project, paths["inference"]))
    entry = [os.path.join(package_src_dir(), SERVE_SCRIPT)] if _shims(cfg) else ["-m", SERVE_MODULE]
    run = _python(cfg) + entry + ["--engine", "upstream", *server_argv, "--", *predictor]
    return bash_script(cfg, [*_ops_install(cfg, paths, project), "exec " + shlex.join(run)], atb=True)
