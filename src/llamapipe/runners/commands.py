"""The shell command of every rule, for the resolved config: where it runs and what it runs.

Rules stay declarations (``shell: "{params.cmd} > {log} 2>&1"``, ``cmd`` from ``rule_command``);
this module is the one config-to-command mapping, testable without Snakemake, and what
``snakemake -n -p`` prints.

- cpu/local:      llamapipe <stage> ...
- cpu/container:  llamapipe container-run --spec {...} -- python -m llamapipe <stage> ...
- npu:            llamapipe container-run --spec {...} -- bash -c '<Ascend env; upstream entry point; our collector>'
                  (the scripts: ``llamapipe.npu.scripts``)
- sft over several processes or nodes: the launcher of ``llamapipe.scaleout.launch``, one layout
  derived per command and passed down.
"""

from __future__ import annotations

import json
import os
import shlex

from llamapipe.config.parallel import plan_argv
from llamapipe.config.paths import CACHE_DIR, PATHS, WORKFLOW_DIR_ENV, image_records, locate_file_url, user_paths
from llamapipe.config.stage_params import stage_params_json
from llamapipe.config.variants import COMPARISON_HTML, COMPARISON_TSV, PLAIN, VARIANT_ENV, Run, variant_dir
from llamapipe.core.cards import parse_cards
from llamapipe.entrypoints import CLI_SCRIPT, SMOKE_SCRIPT, package_src_dir  # noqa: F401 (tests name them here)
from llamapipe.npu import scripts
from llamapipe.npu.devices import device_nodes, driver_mounts
from llamapipe.runners.container import project_id
from llamapipe.scaleout import launch
from llamapipe.scaleout.launch import LaunchLayout

# Stages whose upstream NPU entry point needs accelerator cards, and how many of the visible ones.
NPU_CARDS = {"sft": "all", "smoke_collective": "all", "merge": 1, "export": 1, "predict": 1, "init_model": 0,
             "preflight_image": 1}  # the image checks: one card and the driver mounts, as export/predict
SRUN_TASK_ENV = ("SLURM_NODEID", "SLURM_NNODES", "LLAMAPIPE_MASTER")  # what the per-node launch line reads


def cards_for(stage: str, cfg: dict) -> list[int]:
    if cfg["target"] != "npu":
        return []
    cards = parse_cards(cfg["devices"])
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
            devices = device_nodes(cards, npu["dev_root"])
            mounts += driver_mounts()
        if npu.get("paddlenlp_mount"):
            mounts.append({"source": npu["paddlenlp_mount"], "target": npu["paddlenlp_dir"], "read_only": True})
    # what the user keeps outside the project (their weights, their data archive), read-only
    mounts += [{"source": p, "target": p, "read_only": True} for p in user_paths(stage, cfg, project_dir)]
    if stage == "download_data":  # a relative file: url found in the checkout, not the project (-d OTHER)
        local = locate_file_url(cfg["data"]["url"], project_dir)
        if local is not None and local.base == "workflow":
            env[WORKFLOW_DIR_ENV] = local.workflow_dir
    if cfg["target"] != "npu":
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


def _containerized(stage: str, cfg: dict, project_dir: str, argv: list[str], threads: int,
                   pass_env: tuple[str, ...] = (), label: str | None = None,
                   stop_timeout: float | None = None, stopped_exit: str | None = None) -> str:
    """``label``: the container's rule label in place of the stage's (a command that is no rule);
    ``stop_timeout``, ``stopped_exit``: container-run's ``--stop-timeout`` and ``--stopped-exit``
    (None: its defaults). Rules pass none of them."""
    spec = container_spec(stage, cfg, project_dir, threads, pass_env)
    if label is not None:
        spec["rule"] = label
    runner = ["llamapipe", "container-run", "--spec", json.dumps(spec, sort_keys=True)]
    if stop_timeout is not None:
        runner += ["--stop-timeout", f"{stop_timeout:g}"]
    if stopped_exit is not None:
        runner += ["--stopped-exit", stopped_exit]
    return shlex.join([*runner, "--", *argv])


def _placed(stage: str, cfg: dict, project_dir: str, argv: list[str], threads: int, label: str | None = None,
            stop_timeout: float | None = None, stopped_exit: str | None = None) -> str:
    """``argv`` where the config runs stages: in the stage image, or (the rehearsal's local
    runtime, the cpu default) as a local process."""
    if cfg["runtime"] == "local":
        return shlex.join(argv)
    return _containerized(stage, cfg, project_dir, argv, threads, label=label, stop_timeout=stop_timeout,
                          stopped_exit=stopped_exit)


def placed_like(stage: str, cfg: dict, project_dir: str, argv: list[str], threads: int, label: str,
                stop_timeout: float | None = None, stopped_exit: str | None = None) -> str:
    """``argv`` placed exactly as ``stage``'s command is (its image, cards, device nodes, mounts,
    env, network; or a local process), for a command that is no rule (``llamapipe serve`` on
    target npu: predict's placement). Its container carries the rule label ``label``, so neither
    removes the other's container as a stale one (``runners.container.remove_stale_containers``)."""
    return _placed(stage, cfg, project_dir, argv, threads, label=label, stop_timeout=stop_timeout,
                   stopped_exit=stopped_exit)


def stage_command(stage: str, cfg: dict, paths: dict, project_dir: str, argv: list[str],
                  threads: int = 1, label: str | None = None) -> str:
    """``argv`` is the stage's own CLI call (``llamapipe <stage> ...``); wrap it for the target.
    ``label``: its containers' rule label (a variant's, so two variants' jobs never take each other
    for a stale container)."""
    project = os.path.abspath(project_dir)
    if stage == "sft" and (cfg["target"] == "npu" or launch.launched(cfg)):
        return _sft_command(cfg, paths, project_dir, argv, threads, launch.layout_of(cfg), label)
    if cfg["target"] == "npu" and stage in scripts.STAGE_SCRIPTS:
        return _placed(stage, cfg, project_dir, scripts.STAGE_SCRIPTS[stage](cfg, paths, project, argv), threads,
                       label=label)
    if cfg["runtime"] == "container":
        return _containerized(stage, cfg, project_dir, ["python", "-m", "llamapipe", *argv[1:]], threads,
                              label=label)
    return shlex.join(argv)


def _sft_command(cfg: dict, paths: dict, project_dir: str, argv: list[str], threads: int,
                 layout: LaunchLayout, label: str | None = None) -> str:
    """sft under the launcher: upstream's script on npu, our sft stage on cpu (data parallel,
    ``sft.processes``/``sft.nodes``); with srun, one launcher per node of the SLURM job."""
    project = os.path.abspath(project_dir)
    if cfg["target"] == "npu":
        node_script = scripts.sft_script(cfg, paths, project, layout)
        if not launch.by_srun(layout):
            return _placed("sft", cfg, project_dir, node_script, threads, label=label)
        before = scripts.prepare_sft_script(cfg, paths, project)
        after = scripts.collect_sft_script(cfg, paths, project)
    else:
        inner = list(argv[1:])
        # the rule's threads shared out over the processes on one host
        inner[inner.index("--threads") + 1] = str(max(1, threads // launch.processes_on_one_host(layout)))
        # "--": the launcher's parser classifies every later argument too, and our --train is an
        # ambiguous prefix of its --trainers/--trainer_num ("ambiguous option")
        entry = ["--", os.path.join(package_src_dir(), CLI_SCRIPT), *inner]
        node_script = launch.node_command(layout, launch.launch_argv(layout, entry, paths["sft_launch_logs"]))
        if not launch.by_srun(layout):
            return _placed("sft", cfg, project_dir, node_script, threads, label=label)
        before = after = None
    if cfg["runtime"] == "local":
        per_node = shlex.join(node_script)
    else:
        per_node = _containerized("sft", cfg, project, node_script, threads, SRUN_TASK_ENV, label=label)
    once_before = [_placed("sft", cfg, project_dir, before, threads, label=label)] if before else []
    once_after = [_placed("sft", cfg, project_dir, after, threads, label=label)] if after else []
    return shlex.join(launch.srun_script(layout, per_node, once_after, once_before))


# --- every rule -------------------------------------------------------------------------------

# Our stages: the path flags of each (``llamapipe <stage> --params ... <flags>``).
STAGE_PATH_ARGS = {
    "download_data": [("--out", "raw_data"), ("--cache-dir", "download_cache")],
    "prepare_data": [("--src", "raw_data"), ("--out", "data")],
    "init_model": [("--train", "train"), ("--out", "base_model")],
    "sft": [("--train", "train"), ("--base", "base_model"), ("--out", "sft"), ("--ckpt-dir", "sft_checkpoints")],
    "merge": [("--sft", "sft"), ("--base", "base_model"), ("--out", "merged")],
    "export": [("--merged", "merged"), ("--out", "inference")],
    "predict": [("--inference", "inference"), ("--dev", "dev"), ("--out", "predictions")],
    "evaluate": [("--predictions", "predictions"), ("--out", "metrics")],
}


def stage_argv(stage: str, cfg: dict, threads: int, run: Run = PLAIN) -> list[str]:
    """Our CLI call for a stage: its config section, seed, threads, manifest and paths (``run``'s:
    the plain run's, or a variant's)."""
    argv = ["llamapipe", stage.replace("_", "-"), "--params", stage_params_json(stage, cfg),
            "--seed", str(cfg["seed"]), "--threads", str(threads), "--manifest", run.manifest(stage)]
    for flag, key in STAGE_PATH_ARGS[stage]:
        argv += [flag, run.paths[key]]
    return argv


def npu_build_args(cfg: dict) -> dict:
    """Dockerfile.npu build args: base image and the stack pinned together with it."""
    image = cfg["npu"]["image"]
    return {"BASE_IMAGE": image["base"], "PADDLE_VERSION": image["paddle_version"],
            "PADDLE_CUSTOM_NPU_VERSION": image["paddle_custom_npu_version"],
            "PADDLENLP_COMMIT": image["paddlenlp_commit"], "PADDLENLP_REPO": image["paddlenlp_repo"],
            "PADDLE_INDEX": image["paddle_index"], "PADDLE_NPU_INDEX": image["paddle_npu_index"]}


def _tool_argv(rule: str, cfg: dict, checkout_clone: str | None, auto_layout: bool, run: Run = PLAIN,
               variants: tuple[str, ...] = ()) -> list[str]:
    """The helpers that always run on the host (never in a container)."""
    image = cfg["npu"]["image"]
    paths = run.paths
    if rule == "preflight":  # host checks: they check the host the containers need
        return ["llamapipe", "preflight", "--params", stage_params_json("preflight", cfg), "--out", PATHS["preflight"]]
    if rule == "pull_image":
        return ["llamapipe", "pull-image", "--image", image["base"], "--out", PATHS["base_image"]]
    if rule == "build_image":
        return ["llamapipe", "build-image", "--dockerfile", "Dockerfile.npu", "--tag", image["tag"],
                "--build-args", json.dumps(npu_build_args(cfg), sort_keys=True), "--out", PATHS["image"]]
    if rule == "plan":
        # the configured layout, or the whole search for `auto` (npu only: the rule's other use
        # is the dry-run of the cpu DAG, which never runs it)
        args = plan_argv(cfg, pin=not auto_layout) if cfg["target"] == "npu" else [
            "--model", cfg["npu"]["model_name_or_path"]]
        return ["llamapipe", "plan", *args, "--measured-memory", PATHS["preflight"], "--out", PATHS["plan"]]
    if rule == "paddlenlp_checkout":
        return ["llamapipe", "fetch-paddlenlp", "--repo", image["paddlenlp_repo"], "--commit",
                image["paddlenlp_commit"], "--out", checkout_clone or ".cache/PaddleNLP"]
    if rule == "plots":
        return ["llamapipe", "plots", "--train-log", f"{paths['sft']}/train_log.jsonl",
                "--benchmarks", ",".join(run.benchmarks(cfg)), "--out", paths["plots"]]
    if rule == "report_tables":
        return ["llamapipe", "report-tables", "--metrics", paths["metrics"], "--predictions", paths["predictions"],
                "--out", paths["report_tables"]]
    if rule == "comparison":
        return ["llamapipe", "compare", *[variant_dir(name) for name in variants],
                "--html", COMPARISON_HTML, "--tsv", COMPARISON_TSV]
    if rule == "provenance":
        return ["llamapipe", "provenance", "--manifests", ",".join(run.manifest_dirs()), "--config",
                json.dumps(cfg, sort_keys=True), "--images", ",".join(image_records(cfg)),
                "--out", paths["provenance"]]
    raise KeyError(rule)


NPU_ONLY = ("preflight_image", "build_ops", "smoke_collective")


def rule_command(rule: str, cfg: dict, project_dir: str, threads: int = 1, checkout_clone: str | None = None,
                 auto_layout: bool = False, run: Run = PLAIN, variants: tuple[str, ...] = ()) -> str:
    """The whole shell command of a rule (what ``snakemake -n -p`` prints). ``checkout_clone``:
    where the rehearsal clones PaddleNLP; ``auto_layout``: ``npu.parallel: auto`` was given
    (the plan rule then searches every layout); ``run``: whose paths (the plain run, or a variant
    with ``cfg`` its resolved config); ``variants``: the names the comparison rule compares."""
    project = os.path.abspath(project_dir)
    if rule in STAGE_PATH_ARGS:
        if run.name is None:
            return stage_command(rule, cfg, run.paths, project_dir, stage_argv(rule, cfg, threads), threads)
        command = stage_command(rule, cfg, run.paths, project_dir, stage_argv(rule, cfg, threads, run), threads,
                                f"{rule}.{run.name}")
        # sft's terminal lines name the variant (llamapipe.stages.progress reads it after the pipe)
        return f"export {VARIANT_ENV}={shlex.quote(run.name)}; {command}" if rule == "sft" else command
    if rule in NPU_ONLY:
        if cfg["target"] != "npu":  # in the cpu DAG's rule list only: nothing asks for their outputs
            return f"echo '{rule}: target npu only' && false"
        if rule == "smoke_collective":
            argv = scripts.smoke_collective_script(cfg, PATHS, project, launch.npu_layout(cfg))
        elif rule == "preflight_image":
            argv = scripts.preflight_image_script(cfg, PATHS, project)
        else:
            argv = scripts.build_ops_script(cfg, PATHS, project)
        return _placed(rule, cfg, project_dir, argv, threads)
    return shlex.join(_tool_argv(rule, cfg, checkout_clone, auto_layout, run, tuple(variants)))
