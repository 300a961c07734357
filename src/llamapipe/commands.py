"""The shell command of every stage, for the resolved config: where it runs and what it runs.

Rules stay declarations (``shell: "{params.cmd} > {log} 2>&1"``); this module is the one
config-to-command mapping, testable without Snakemake, and what ``snakemake -n -p`` prints.

- cpu/local:      llamapipe <stage> ...
- cpu/container:  llamapipe container-run --spec {...} -- python -m llamapipe <stage> ...
- npu:            llamapipe container-run --spec {...} -- bash -c '<Ascend env; upstream entry point; our collector>'
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

from llamapipe import checkpoint_io, launch, upstream_npu
from llamapipe.ascend_checks import NPU_SMI_GUIDE_PATH, Host, find_npu_smi
from llamapipe.config import visible_cards
from llamapipe.runners.container import NPU_CONTROL_DEVICES, NPU_DRIVER_PATHS, project_id

# Stages whose upstream NPU entry point needs accelerator cards, and how many of the visible ones.
NPU_CARDS = {"sft": "all", "smoke_collective": "all", "merge": 1, "export": 1, "predict": 1, "init_model": 0,
             "preflight_image": 1}  # the image checks: one card and the driver mounts, as export/predict
CACHE_DIR = ".cache"  # project-relative: downloads that outlive one container


def cards_for(stage: str, cfg: dict) -> list[int]:
    if cfg["target"] != "npu":
        return []
    cards = visible_cards(cfg["devices"])
    want = NPU_CARDS.get(stage, 0)
    return cards if want == "all" else cards[:want]


def _device_groups(devices: list[str]) -> list[str]:
    """Group ids owning the device nodes (HwHiAiUser on Ascend hosts): a container running as the
    caller's uid:gid gets them as supplementary groups, so it can open the cards."""
    return sorted({str(os.stat(d).st_gid) for d in devices if os.path.exists(d)} - {str(os.getgid())})


def container_spec(stage: str, cfg: dict, project_dir: str, threads: int = 1,
                   pass_env: tuple[str, ...] = ()) -> dict:
    """What the container runner needs: image, devices, mounts, env, limits, labels.
    ``pass_env``: variables copied from the runner's environment when it starts the container
    (what srun sets per task: ``$SLURM_NODEID`` ...)."""
    project_dir = os.path.abspath(project_dir)
    code = package_src_dir()
    # HOME: the caller's uid has no home in the image (pip, PaddleNLP caches); downloads of named
    # models go to the project so a rerun does not fetch them again.
    env = {"PYTHONPATH": code, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "HOME": "/tmp",
           "PPNLP_HOME": os.path.join(project_dir, CACHE_DIR, "paddlenlp")}
    mounts = [{"source": project_dir, "target": project_dir, "read_only": False}]
    if not code.startswith(project_dir + os.sep):  # stage code installed elsewhere: mount it read-only
        mounts.append({"source": code, "target": code, "read_only": True})
    devices: list[str] = []
    if cfg["target"] == "npu":
        npu = cfg["npu"]
        image, shm, network, privileged = npu["image"]["tag"], npu["shm_size"], npu["network"], npu["privileged"]
        cards = cards_for(stage, cfg)
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, cards))
        if cards and npu["device"] == "npu":
            devices = [f"{npu['dev_root']}/davinci{c}" for c in cards]
            devices += [f"{npu['dev_root']}/{name}" for name in NPU_CONTROL_DEVICES]
            # npu-smi from where this host has it (driver installs: /usr/local/sbin), at the guide's path
            smi = find_npu_smi(Host()) or NPU_SMI_GUIDE_PATH
            mounts += [{"source": smi if m == NPU_SMI_GUIDE_PATH else m, "target": m, "read_only": True}
                       for m in NPU_DRIVER_PATHS]
        if npu.get("paddlenlp_mount"):
            mounts.append({"source": npu["paddlenlp_mount"], "target": npu["paddlenlp_dir"], "read_only": True})
    else:
        box = cfg["container"]
        image, shm, network, privileged = box["image"], box["shm_size"], box["network"], box["privileged"]
        if stage == "sft" and launch.launched(cfg) and network == "none":
            # gloo binds to the address the hostname resolves to, which network none cannot
            # reach; the processes meet over the loopback (as the rehearsal's smoke_collective)
            env["GLOO_SOCKET_IFNAME"] = "lo"
    spec_extra = {"pass_env": list(pass_env)} if pass_env else {}
    return {**spec_extra,
        "image": image, "devices": devices, "mounts": mounts, "env": env, "shm_size": shm,
        "privileged": privileged, "network": network, "workdir": project_dir, "rule": stage,
        "project": project_id(project_dir), "user": f"{os.getuid()}:{os.getgid()}",
        "group_add": _device_groups(devices),
    }


def package_src_dir() -> str:
    """The directory that holds this package: stage code runs from it inside containers."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _containerized(stage: str, cfg: dict, project_dir: str, argv: list[str], threads: int,
                   pass_env: tuple[str, ...] = ()) -> str:
    spec = json.dumps(container_spec(stage, cfg, project_dir, threads, pass_env), sort_keys=True)
    return shlex.join(["llamapipe", "container-run", "--spec", spec, "--", *argv])


SRUN_TASK_ENV = ("SLURM_NODEID", "SLURM_NNODES", "LLAMAPIPE_MASTER")  # what the per-node launch line reads


def _npu_script(cfg: dict, lines: list[str], atb: bool = False) -> list[str]:
    """bash -c script: Ascend env, then the commands, from the checkout's llm/ directory.

    PYTHONPATH: the checkout (``from llm.predict.predictor import``), ``llm/`` (``from utils...``)
    and ``llm/devices/`` (export on npu: ``from npu.llama.export_utils import``; upstream's own
    export_npu.sh misses it since the module moved there)."""
    npu = cfg["npu"]
    root, pdnlp = npu["ascend_root"], npu["paddlenlp_dir"]
    prelude = ["set -eo pipefail"]
    if npu["ascend_env"]:
        prelude += [f"source {root}/{s}" for s in upstream_npu.ASCEND_ENV_SCRIPTS]
        if atb:
            found = " ".join(f"{root}/{s}" for s in upstream_npu.ATB_ENV_SCRIPTS)
            prelude += [f"atb=$(ls {found} 2>/dev/null | head -n 1)",
                        f'[ -n "$atb" ] || (echo "no ATB set_env.sh under {root} (atb/ or nnal/atb/)" >&2 && false)',
                        'source "$atb"']
    prelude += [f"export PYTHONPATH={pdnlp}:{pdnlp}/llm:{pdnlp}/llm/devices${{PYTHONPATH:+:$PYTHONPATH}}",
                f"cd {pdnlp}/llm"]
    # set -e: the first failing step fails the rule. No step holds "; " (tests split on it).
    return ["bash", "-c", "; ".join(prelude + lines)]


def stage_command(stage: str, cfg: dict, paths: dict, project_dir: str, argv: list[str],
                  threads: int = 1) -> str:
    """``argv`` is the stage's own CLI call (``llamapipe <stage> ...``); wrap it for the target."""
    if stage == "sft" and cfg["target"] == "npu" and launch.by_srun(launch.npu_layout(cfg)):
        return _npu_sft_srun(cfg, paths, os.path.abspath(project_dir), threads)
    if stage == "sft" and cfg["target"] != "npu" and launch.launched(cfg):
        return _cpu_launched_sft(cfg, paths, project_dir, argv, threads)
    if cfg["target"] == "npu" and stage in NPU_UPSTREAM:
        inner = NPU_UPSTREAM[stage](cfg, paths, os.path.abspath(project_dir), argv)
        if cfg["runtime"] == "local":  # the rehearsal's local runtime: the same script, no container
            return shlex.join(inner)
        return _containerized(stage, cfg, project_dir, inner, threads)
    if cfg["runtime"] == "container":
        return _containerized(stage, cfg, project_dir, ["python", "-m", "llamapipe", *argv[1:]], threads)
    return shlex.join(argv)


def _cpu_launched_sft(cfg: dict, paths: dict, project_dir: str, argv: list[str], threads: int) -> str:
    """sft.processes > 1, sft.nodes > 1 or srun: our sft stage under paddle.distributed.launch, data
    parallel, through the launcher builder the npu target uses; the rule's threads shared out."""
    layout = launch.cpu_layout(cfg)
    inner = list(argv[1:])
    inner[inner.index("--threads") + 1] = str(max(1, threads // launch.processes_on_one_host(layout)))
    # "--": the launcher's parser classifies every later argument too, and our --train is an
    # ambiguous prefix of its --trainers/--trainer_num ("ambiguous option")
    entry = ["--", os.path.join(package_src_dir(), CLI_SCRIPT), *inner]
    run = launch.node_command(layout, launch.launch_argv(layout, entry, paths["sft_launch_logs"]))
    if launch.by_srun(layout):
        per_node = (_containerized("sft", cfg, project_dir, run, threads, SRUN_TASK_ENV)
                    if cfg["runtime"] == "container" else shlex.join(run))
        return shlex.join(launch.srun_script(layout, per_node, after=[]))
    if cfg["runtime"] == "container":
        return _containerized("sft", cfg, project_dir, run, threads)
    return shlex.join(run)


def _abs(project: str, path: str) -> str:
    return os.path.join(project, path)


def _model(cfg: dict, paths: dict, project: str) -> str:
    """The base model upstream loads: a hub name as is, the model init_model built as a path."""
    name = cfg["npu"]["model_name_or_path"]
    return _abs(project, name) if name == paths["base_model"] else name


def _python(cfg: dict) -> list[str]:
    """How upstream scripts are started (the rehearsal: through llamapipe.cpu_shims)."""
    return ["python", "-m", "llamapipe.cpu_shims"] if cfg["npu"]["cpu_shims"] else ["python"]


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


def _npu_sft(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Upstream's training script under the launcher (one node, or the local stand-in for N:
    ``llamapipe.local_nodes``), then collect-sft; with srun, the per-node part alone."""
    out = _abs(project, paths["sft_checkpoints"])
    model = _model(cfg, paths, project)
    if cfg["npu"]["pretrain"]["enabled"]:
        input_dir = _abs(project, cfg["npu"]["pretrain"]["input_dir"])  # the project's, not llm/'s
        cache = _abs(project, paths["pretrain_data_cache"])  # upstream's ./data_cache: inside the checkout
        script, args = "run_pretrain.py", upstream_npu.pretrain_args(cfg, model, input_dir, out, cache)
    else:
        script, args = "run_finetune.py", upstream_npu.finetune_args(cfg, model, _abs(project, paths["data"]), out)
    launch_logs = _abs(project, paths["sft_launch_logs"])
    layout = launch.npu_layout(cfg)
    argv_launch = upstream_npu.launch_argv(cfg, script, launch_logs) + args
    if launch.by_srun(layout):  # the per-node step of _npu_sft_srun: srun starts it on every node
        return _npu_script(cfg, [*_training_env(cfg), launch.shell_line(argv_launch)])
    run = launch.node_command(layout, argv_launch)
    return _npu_script(cfg, [*_training_env(cfg), shlex.join(run), shlex.join(_collect_sft(cfg, paths, project))])


def _collect_sft(cfg: dict, paths: dict, project: str) -> list[str]:
    return ["python", "-m", "llamapipe", "collect-sft", "--ckpt-dir", _abs(project, paths["sft_checkpoints"]),
            "--launch-logs", _abs(project, paths["sft_launch_logs"]), "--out", _abs(project, paths["sft"]),
            "--save-total-limit", str(cfg["sft"]["save_total_limit"])]


def _npu_sft_srun(cfg: dict, paths: dict, project: str, threads: int) -> str:
    """npu.node_launcher srun (a SLURM job over npu.nodes): srun starts sft's script (container, Ascend env, launcher with
    --nnodes $SLURM_NNODES --master $LLAMAPIPE_MASTER) once per node; collect-sft runs once after."""
    layout = launch.npu_layout(cfg)
    node_script = _npu_sft(cfg, paths, project, [])
    collect = _npu_script(cfg, [shlex.join(_collect_sft(cfg, paths, project))])
    if cfg["runtime"] == "local":
        per_node, after = shlex.join(node_script), shlex.join(collect)
    else:
        per_node = _containerized("sft", cfg, project, node_script, threads, SRUN_TASK_ENV)
        after = _containerized("sft", cfg, project, collect, threads)
    return shlex.join(launch.srun_script(layout, per_node, [after]))


def _training_env(cfg: dict) -> list[str]:
    """The exports of sft's script (smoke_collective's too: the same environment)."""
    # npu.env in the script, as upstream's training scripts export it (its export/predict scripts
    # set none of it), so the rehearsal's local runtime runs with it too
    training_env = [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(cfg["npu"]["env"].items())]
    # upstream's checkpoint integrity: `.checkpoint_done` last in each checkpoint, and a rerun
    # resumes from the newest complete one (a kill during a save must not poison the resume)
    resume = [f"export {k}={v}" for k, v in checkpoint_io.COMPLETE_CHECKPOINTS_ENV.items()]
    return training_env + resume


SMOKE_SCRIPT = os.path.join("llamapipe", "stages", "smoke_collective.py")  # under package_src_dir()
CLI_SCRIPT = os.path.join("llamapipe", "entrypoints", "cli_script.py")  # our CLI as the launcher's script


def _npu_smoke_collective(cfg: dict, paths: dict, project: str) -> list[str]:
    """An all-reduce and a matmul on every card sft uses, before sft: sft's script prelude and
    exports, its launcher (``launch_argv``, the same flags but --log_dir), under
    ``npu.smoke_timeout_s`` (``llamapipe.collective_check`` names the ranks that did not report)."""
    npu = cfg["npu"]
    cards = npu.get("smoke_devices") or cfg["devices"]  # smoke_devices: the rehearsal's two processes
    logs = _abs(project, paths["smoke_launch_logs"])
    reports = os.path.join(logs, "ranks")
    script = os.path.join(package_src_dir(), SMOKE_SCRIPT)
    # one node's cards (several nodes: the node that runs the job), as sft's launcher starts them
    one_node = {**cfg, "devices": cards, "npu": {**npu, "nodes": 1, "node_launcher": "local"}}
    launch_cmd = upstream_npu.launch_argv(one_node, script, logs)
    check = ["python", "-m", "llamapipe.collective_check", "--timeout", str(npu["smoke_timeout_s"]),
             "--cards", cards, "--reports", reports, "--launch-logs", logs,
             "--out", _abs(project, paths["smoke_collective"]), "--"]
    return _npu_script(cfg, [*_training_env(cfg), shlex.join([*check, *launch_cmd, "--reports", reports])])


def smoke_collective_command(cfg: dict, paths: dict, project_dir: str, threads: int = 1) -> str:
    """Rule smoke_collective (npu target): in the stage image, as sft runs (threads: sft's)."""
    project = os.path.abspath(project_dir)
    script = _npu_smoke_collective(cfg, paths, project)
    if cfg["runtime"] == "local":
        return shlex.join(script)
    return _containerized("smoke_collective", cfg, project, script, threads)


def _npu_merge(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Full SFT: our merge (one pdparams, config fix-up). LoRA: upstream's merge_lora_params.py
    first, then the same merge of its output."""
    if not cfg["sft"]["lora"]:
        return _npu_own_stage(cfg, paths, project, argv)
    folded = _abs(project, paths["merged"]) + ".lora"
    merge_lora = _python(cfg) + ["tools/merge_lora_params.py", *upstream_npu.merge_lora_args(
        cfg, _model(cfg, paths, project), _abs(project, paths["sft"]), folded)]
    ours = list(argv[1:])
    ours[ours.index("--sft") + 1] = folded
    return _npu_script(cfg, [f"rm -rf {shlex.quote(folded)}", shlex.join(merge_lora), _check("model", folded),
                             f"cd {shlex.quote(project)}", shlex.join(["python", "-m", "llamapipe", *ours]),
                             f"rm -rf {shlex.quote(folded)}"])


def _npu_export(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    final = _abs(project, paths["inference"])
    tmp = final + ".tmp"
    export = _python(cfg) + ["predict/export_model.py",
                             *upstream_npu.export_args(cfg, _abs(project, paths["merged"]), tmp)]
    return _npu_script(cfg, [*_ops_install(cfg, paths, project), f"rm -rf {shlex.quote(tmp)}", shlex.join(export),
                             _check("export", tmp), f"mv {shlex.quote(tmp)} {shlex.quote(final)}"], atb=True)


def _npu_predict(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    raw = _abs(project, paths["predictions"]) + ".upstream.jsonl"
    predict = _python(cfg) + ["predict/predictor.py", *upstream_npu.predictor_args(
        cfg, _abs(project, paths["inference"]), _abs(project, paths["dev"]), raw)]
    collect = ["python", "-m", "llamapipe", "collect-predictions", "--upstream", raw,
               "--dev", _abs(project, paths["dev"]), "--out", _abs(project, paths["predictions"])]
    return _npu_script(cfg, [*_ops_install(cfg, paths, project), f"rm -f {shlex.quote(raw)}", shlex.join(predict),
                             shlex.join(collect)], atb=True)


def _npu_own_stage(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Stages that are our own code on both targets, inside the NPU image (Ascend env for paddle)."""
    return _npu_script(cfg, [f"cd {shlex.quote(project)}", shlex.join(["python", "-m", "llamapipe", *argv[1:]])])


NPU_UPSTREAM: dict[str, Any] = {
    "sft": _npu_sft,
    "export": _npu_export,
    "predict": _npu_predict,
    "merge": _npu_merge,
    "init_model": _npu_own_stage,
    "download_data": _npu_own_stage,
    "prepare_data": _npu_own_stage,
    "evaluate": _npu_own_stage,
}


def preflight_image_command(cfg: dict, paths: dict, project_dir: str) -> str:
    """Rule preflight_image (npu): ``llamapipe.ascend_checks``' image checks, in the stage image
    through the stages' own wrapper and CANN prelude; ATB's set_env.sh is sourced by the checks
    themselves (as export/predict source it), so its absence is reported with everything else."""
    project = os.path.abspath(project_dir)
    npu = cfg["npu"]
    params = {"ascend_root": npu["ascend_root"], "env_scripts": list(upstream_npu.ASCEND_ENV_SCRIPTS),
              "atb_scripts": list(upstream_npu.ATB_ENV_SCRIPTS), "ascend_env": npu["ascend_env"],
              "device": npu["device"], "pairing": npu["pairing"], "shm_size": npu["shm_size"],
              "inference_model": npu["inference_model"], "wheels": _abs(project, paths["wheels"])}
    check = ["python", "-m", "llamapipe", "preflight-image", "--params", json.dumps(params, sort_keys=True),
             "--out", _abs(project, paths["image_preflight"])]
    script = _npu_script(cfg, [f"cd {shlex.quote(project)}", shlex.join(check)])
    if cfg["runtime"] == "local":
        return shlex.join(script)
    return _containerized("preflight_image", cfg, project, script, threads=1)


def build_ops_command(cfg: dict, paths: dict, project_dir: str) -> str:
    """The guide's step 6 (``cd csrc/npu; python setup.py build bdist_wheel``), in a copy of
    ``csrc/npu``: the checkout is root-owned in the image (read-only in the rehearsal)."""
    project = os.path.abspath(project_dir)
    pdnlp, wheels = cfg["npu"]["paddlenlp_dir"], _abs(project, paths["wheels"])
    tmp = wheels + ".tmp"
    script = _npu_script(cfg, [
        f"rm -rf {shlex.quote(tmp)}", f"mkdir -p {shlex.quote(tmp)}", "build=$(mktemp -d)",
        f"cp -r {pdnlp}/csrc/npu/. $build/", "cd $build", "python setup.py build bdist_wheel",
        f"cp dist/paddlenlp_ops-*.whl {shlex.quote(tmp)}/", _check("wheels", tmp),
        f"mv {shlex.quote(tmp)} {shlex.quote(wheels)}",
    ])
    if cfg["runtime"] == "local":
        return shlex.join(script)
    return _containerized("build_ops", cfg, project, script, threads=1)
