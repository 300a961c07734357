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

from llamapipe import upstream_npu
from llamapipe.config import visible_cards
from llamapipe.runners.container import NPU_CONTROL_DEVICES, NPU_DRIVER_PATHS, project_id

# Stages whose upstream NPU entry point needs accelerator cards, and how many of the visible ones.
NPU_CARDS = {"sft": "all", "merge": 1, "export": 1, "predict": 1, "init_model": 0}


def cards_for(stage: str, cfg: dict) -> list[int]:
    if cfg["target"] != "npu":
        return []
    cards = visible_cards(cfg["devices"])
    want = NPU_CARDS.get(stage, 0)
    return cards if want == "all" else cards[:want]


def container_spec(stage: str, cfg: dict, project_dir: str, threads: int = 1) -> dict:
    """What the container runner needs: image, devices, mounts, env, limits, labels."""
    project_dir = os.path.abspath(project_dir)
    code = package_src_dir()
    env = {"PYTHONPATH": code, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    mounts = [{"source": project_dir, "target": project_dir, "read_only": False}]
    if not code.startswith(project_dir + os.sep):  # stage code installed elsewhere: mount it read-only
        mounts.append({"source": code, "target": code, "read_only": True})
    devices: list[str] = []
    if cfg["target"] == "npu":
        npu = cfg["npu"]
        cards = cards_for(stage, cfg)
        image, shm, network, privileged = npu["image"]["tag"], npu["shm_size"], npu["network"], npu["privileged"]
        env.update({k: str(v) for k, v in npu["env"].items()})
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(map(str, cards))
        if cards:
            devices = [f"{npu['dev_root']}/davinci{c}" for c in cards]
            devices += [f"{npu['dev_root']}/{name}" for name in NPU_CONTROL_DEVICES]
            mounts += [{"source": m, "target": m, "read_only": True} for m in NPU_DRIVER_PATHS]
    else:
        box = cfg["container"]
        image, shm, network, privileged = box["image"], box["shm_size"], box["network"], box["privileged"]
    return {
        "image": image, "devices": devices, "mounts": mounts, "env": env, "shm_size": shm,
        "privileged": privileged, "network": network, "workdir": project_dir, "rule": stage,
        "project": project_id(project_dir), "user": f"{os.getuid()}:{os.getgid()}",
    }


def package_src_dir() -> str:
    """The directory that holds this package: stage code runs from it inside containers."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _containerized(stage: str, cfg: dict, project_dir: str, argv: list[str], threads: int) -> str:
    spec = json.dumps(container_spec(stage, cfg, project_dir, threads), sort_keys=True)
    return shlex.join(["llamapipe", "container-run", "--spec", spec, "--", *argv])


def _npu_script(cfg: dict, lines: list[str], atb: bool = False) -> list[str]:
    """bash -c script: Ascend env, then the commands, from the checkout's llm/ directory."""
    root, pdnlp = cfg["npu"]["ascend_root"], cfg["npu"]["paddlenlp_dir"]
    scripts = list(upstream_npu.ASCEND_ENV_SCRIPTS) + ([upstream_npu.ATB_ENV_SCRIPT] if atb else [])
    prelude = ["set -eo pipefail"] + [f"source {root}/{s}" for s in scripts] + [
        f"export PYTHONPATH={pdnlp}:{pdnlp}/llm:$PYTHONPATH", f"cd {pdnlp}/llm",
    ]
    return ["bash", "-c", "; ".join(prelude + lines)]  # set -e: the first failing step fails the rule


def stage_command(stage: str, cfg: dict, paths: dict, project_dir: str, argv: list[str],
                  threads: int = 1) -> str:
    """``argv`` is the stage's own CLI call (``llamapipe <stage> ...``); wrap it for the target."""
    if cfg["target"] == "npu" and stage in NPU_UPSTREAM:
        inner = NPU_UPSTREAM[stage](cfg, paths, os.path.abspath(project_dir), argv)
        return _containerized(stage, cfg, project_dir, inner, threads)
    if cfg["runtime"] == "container":
        return _containerized(stage, cfg, project_dir, ["python", "-m", "llamapipe", *argv[1:]], threads)
    return shlex.join(argv)


def _abs(project: str, path: str) -> str:
    return os.path.join(project, path)


def _ops_install(paths: dict, project: str) -> str:
    return f"python -m pip install --no-deps --force-reinstall {shlex.quote(_abs(project, paths['wheels']))}/*.whl"


def _npu_sft(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    out = _abs(project, paths["sft_checkpoints"])
    if cfg["npu"]["pretrain"]["enabled"]:
        script, args = "run_pretrain.py", upstream_npu.pretrain_args(cfg, out)
    else:
        script, args = "run_finetune.py", upstream_npu.finetune_args(cfg, _abs(project, paths["data"]), out)
    launch = upstream_npu.launch_argv(cfg, script, _abs(project, paths["sft_launch_logs"]))
    collect = ["python", "-m", "llamapipe", "collect-sft", "--ckpt-dir", out, "--out", _abs(project, paths["sft"])]
    return _npu_script(cfg, [shlex.join(launch + args), shlex.join(collect)])


def _npu_export(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    final = _abs(project, paths["inference"])
    tmp = final + ".tmp"
    export = ["python", "predict/export_model.py", *upstream_npu.export_args(cfg, _abs(project, paths["merged"]), tmp)]
    return _npu_script(cfg, [_ops_install(paths, project), f"rm -rf {shlex.quote(tmp)}", shlex.join(export),
                             f"mv {shlex.quote(tmp)} {shlex.quote(final)}"], atb=True)


def _npu_predict(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    raw = _abs(project, paths["predictions"]) + ".upstream.jsonl"
    predict = ["python", "predict/predictor.py",
               *upstream_npu.predictor_args(cfg, _abs(project, paths["inference"]), _abs(project, paths["dev"]), raw)]
    collect = ["python", "-m", "llamapipe", "collect-predictions", "--upstream", raw,
               "--dev", _abs(project, paths["dev"]), "--out", _abs(project, paths["predictions"])]
    return _npu_script(cfg, [_ops_install(paths, project), shlex.join(predict), shlex.join(collect)], atb=True)


def _npu_own_stage(cfg: dict, paths: dict, project: str, argv: list[str]) -> list[str]:
    """Stages that are our own code on both targets, inside the NPU image (Ascend env for paddle)."""
    return _npu_script(cfg, [f"cd {shlex.quote(project)}", shlex.join(["python", "-m", "llamapipe", *argv[1:]])])


NPU_UPSTREAM: dict[str, Any] = {
    "sft": _npu_sft,
    "export": _npu_export,
    "predict": _npu_predict,
    "merge": _npu_own_stage,
    "init_model": _npu_own_stage,
    "download_data": _npu_own_stage,
    "prepare_data": _npu_own_stage,
    "evaluate": _npu_own_stage,
}


def build_ops_command(cfg: dict, paths: dict, project_dir: str) -> str:
    """The guide's step 6 (``cd csrc/npu; python setup.py build bdist_wheel``) in the image."""
    project = os.path.abspath(project_dir)
    pdnlp, wheels = cfg["npu"]["paddlenlp_dir"], _abs(project, paths["wheels"])
    tmp = wheels + ".tmp"
    script = _npu_script(cfg, [
        f"rm -rf {shlex.quote(tmp)}", f"mkdir -p {shlex.quote(tmp)}",
        f"cd {pdnlp}/csrc/npu", "python setup.py build bdist_wheel",
        f"cp dist/paddlenlp_ops-*.whl {shlex.quote(tmp)}/", f"mv {shlex.quote(tmp)} {shlex.quote(wheels)}",
    ])
    return _containerized("build_ops", cfg, project, script, threads=1)
