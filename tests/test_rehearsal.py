"""The NPU target rehearsed on CPU (``--config target=npu rehearsal=cpu``).

- The rehearsal's commands are the NPU dry-run's commands but for the items of
  ``llamapipe.config.rehearsal``'s list: every differing flag, step or rule is explained by one listed
  config key (the mapping below is written from upstream's argument names, not from our code),
  and every listed key explains something. Runs anywhere: a stand-in checkout suffices.
- End to end with upstream's own scripts: needs a PaddleNLP checkout at the pinned commit, named
  by LLAMAPIPE_PADDLENLP_SRC (CI cannot reach GitHub: those tests skip there, saying so).
- Failing loudly: an upstream step that exits 0 having written nothing fails its rule.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import copy_project, snakemake
from llamapipe.config import rehearsal
from llamapipe.core.errors import PipelineError
from llamapipe.npu.checkout import CHECKOUT_FILES
from npu_commands import (
    COLLECTIVE_CHECK,
    SMOKE_SCRIPT,
    UPSTREAM_SCRIPTS,
    collective_check,
    flags,
    parse,
    sft_only,
    shell_commands,
)

P = "{project}"

CHECKOUT = os.environ.get(rehearsal.CHECKOUT_ENV)
needs_checkout = pytest.mark.skipif(
    not CHECKOUT,
    reason=f"set {rehearsal.CHECKOUT_ENV}=<PaddleNLP checkout at the pinned commit> to run upstream's scripts")

# Where a rehearsal command may differ from the NPU one, and the listed key that explains it.
SFT_SIZES = {"--per_device_train_batch_size", "--gradient_accumulation_steps", "--max_steps", "--learning_rate",
             "--warmup_steps", "--save_steps", "--src_length", "--max_length", "--bf16", "--fp16", "--lora_rank"}
PARALLEL = {"--tensor_parallel_degree", "--pipeline_parallel_degree", "--sharding_parallel_degree", "--sharding",
            "--sharding_parallel_config", "--sequence_parallel", "--recompute"}
FUSED = {"--fp16_opt_level", "--use_flash_attention", "--use_fused_rms_norm", "--pad_to_multiple_of"}
PLAN = {"--model": "npu.model_config", "--model-config": "npu.model_config", "--cards": "devices",
        "--seq-length": "npu.sft", "--micro-batch": "npu.sft", "--grad-acc": "npu.sft", "--dtype": "npu.sft",
        "--sharding-stage": "npu.parallel", "--sequence-parallel": "npu.parallel",
        "--no-sequence-parallel": "npu.parallel", "--tp": "npu.parallel", "--sharding": "npu.parallel",
        "--expect-layout": "npu.parallel", "--lora-rank": "npu.sft",
        "--flash-attention": "npu.fused.use_flash_attention", "--no-flash-attention": "npu.fused.use_flash_attention"}


def explain(loc: tuple, runtime: str = "local", value: str | None = None) -> str | tuple | None:
    """The listed key (or keys) that explain a difference at ``loc`` (``value``: the rehearsal's)."""
    rule, where, name = loc
    if rule in ("pull_image", "build_image") or (where, name) == ("provenance", "--images"):
        return "npu.image.build"
    if where in ("container", "spec", "mount", "env") and runtime == "local":
        return "runtime"  # no container at all
    if where == "spec":
        return {"image": "npu.image.tag", "network": "npu.network", "devices": "npu.device",
                "group_add": "npu.device"}.get(name)
    if where == "mount":
        return "npu.paddlenlp_mount" if name == "/opt/PaddleNLP" else (
            "npu.device" if name.startswith("/usr/local/") else None)  # the driver mounts go with the cards
    if where == "env":
        return "devices" if name == "ASCEND_RT_VISIBLE_DEVICES" else None
    if where == "step":
        if name.startswith(("source ", "atb=", "[ -n $atb ]")):
            return "npu.ascend_env"
        if name.startswith("export GLOO_SOCKET_IFNAME="):
            return "npu.env.GLOO_SOCKET_IFNAME"
        if name.startswith(("export OMP_NUM_THREADS=", "export MKL_NUM_THREADS=")):
            return f"npu.env.{name.split()[1].split('=')[0]}"
        if name.startswith("python -m llamapipe.stages.collect prepare-sft "):
            return "npu.sft"  # its --max-steps
        return "npu.inference_model" if name == "python -c import paddlenlp_ops" else None
    if where == "runner":  # through llamapipe.npu.cpu_shims: each named stand-in is a listed key
        shims = next(w for w in (value or "").split() if w.startswith("--shims="))[len("--shims="):]
        return tuple(f"npu.cpu_shims.{name}" for name in shims.split(","))
    if where == "launch":
        return "npu.device" if name in ("--devices", "--nproc_per_node") else None
    if where == "collective_check":
        return "devices" if name == "--cards" else None  # one process per rank: the smoke test's too
    if where == "plan":
        return PLAN.get(name)
    if where == "download-data":  # url, sha256, where the pin goes: the archive
        return "npu.data"
    if where in ("preflight", "preflight-image", "init-model", "merge", "plots"):  # --params keys and plain flags
        return {"device": "npu.device", "devices": "devices", "runtime": "runtime",
                "sft_dtype": "npu.sft", "ascend_env": "npu.ascend_env", "inference_model": "npu.inference_model",
                "paddlenlp_checkout": "npu.paddlenlp_dir" if runtime == "local" else "npu.paddlenlp_mount",
                "model_name_or_path": "npu.model_name_or_path", "model_built": "npu.model_name_or_path",
                "dtype": "npu.export", "--benchmarks": "npu.image.build"}.get(name) or (
            "npu.model_name_or_path" if where == "init-model" else None)
    if name == "--device":
        return "npu.device"
    if name in ("--inference_model", "--block_attn"):
        return "npu.inference_model"
    if name == "--model_name_or_path" and where in ("run_finetune.py", "tools/merge_lora_params.py"):
        return "npu.model_name_or_path"  # export/predict read our own results paths on both
    if where == "run_finetune.py":
        return "npu.sft" if name in SFT_SIZES else "npu.parallel" if name in PARALLEL else (
            f"npu.fused.{name[2:]}" if name in FUSED else None)
    if where in ("predict/export_model.py", "predict/predictor.py"):
        return {"--dtype": "npu.export", "--src_length": "npu.sft", "--batch_size": "npu.predict",
                "--max_length": "npu.export" if where == "predict/export_model.py" else "npu.predict"}.get(name)
    return None


def locations(rule: str, command: str) -> dict:
    """A command as {(rule, where, name): value}: its container, each step, each flag."""
    cmd = parse(command)
    out: dict = {(rule, "rule", ""): True}
    if cmd.spec is not None:
        out[(rule, "container", "")] = True
        spec = dict(cmd.spec)
        for mount in spec.pop("mounts"):
            out[(rule, "mount", mount["target"])] = json.dumps(mount, sort_keys=True)
        out.update({(rule, "env", k): v for k, v in spec.pop("env").items()})
        out.update({(rule, "spec", k): json.dumps(v, sort_keys=True) for k, v in spec.items()})
    for step in cmd.steps or [cmd.argv]:
        if step[:3] == COLLECTIVE_CHECK:  # the smoke test's supervisor, then its launcher step
            check, step = collective_check(step)
            out.update({(rule, "collective_check", k): v for k, v in check.items()})
        script = next((s for s in (*UPSTREAM_SCRIPTS, SMOKE_SCRIPT) if s in step), None)
        if script:
            head = step[:step.index(script)]
            if "paddle.distributed.launch" in head:
                at = head.index("paddle.distributed.launch") + 1
                # the launcher's own flags end where its entry starts (the rehearsal's shim script)
                entry = next((i for i, w in enumerate(head) if w.endswith("cpu_shims_script.py")), len(head))
                out.update({(rule, "launch", k): v for k, v in flags(head[at:entry]).items()})
                head = head[:at] + head[entry:]
            out[(rule, "runner", script)] = " ".join(head)
            out.update({(rule, script, k): v for k, v in flags(step[step.index(script) + 1:]).items()})
        elif step[:1] == ["llamapipe"] or step[:3] == ["python", "-m", "llamapipe"]:
            name = step[1] if step[0] == "llamapipe" else step[3]
            for k, v in flags(step[step.index(name) + 1:]).items():
                if k == "--params":
                    out.update({(rule, name, p): json.dumps(pv) for p, pv in json.loads(v).items()})
                elif k != "--config":  # provenance records the whole resolved config
                    out[(rule, name, k)] = v
        else:
            out[(rule, "step", " ".join(step))] = True
    return out


def fake_checkout(root: Path) -> Path:
    """The files the rehearsal checks for; enough for a dry-run (and scripts that write nothing)."""
    for rel in CHECKOUT_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("print('this stand-in writes nothing')\n")
    return root


def dry_run_locations(project: Path, *config: str, env: dict | None = None) -> dict:
    out = snakemake(project, "-n", "-p", "--config", "target=npu", *config, env=env).stdout
    found: dict = {}
    for rule, command in shell_commands(out).items():
        found.update(locations(rule, command))
    return found


@pytest.mark.parametrize("lora, runtime", [(False, "local"), (True, "local"), (False, "container")],
                         ids=["full", "lora", "full-container"])
def test_rehearsal_commands_are_the_npu_commands_but_for_the_list(tmp_path, lora, runtime):
    project = copy_project(tmp_path / "project")
    checkout = fake_checkout(tmp_path / "PaddleNLP")
    extra = ["--configfile", "lora.yaml"] if lora else []
    (project / "lora.yaml").write_text("sft:\n  lora: true\n")
    npu = dry_run_locations(project, *extra)
    env = {rehearsal.CHECKOUT_ENV: str(checkout)}
    text = snakemake(project, "-n", "-p", "--config", "target=npu", "rehearsal=cpu", f"runtime={runtime}", *extra,
                     env=env).stdout
    # the checkout's location is itself a listed difference (npu.paddlenlp_dir): substitute it back
    rehearsed: dict = {}
    for rule, command in shell_commands(text.replace(str(checkout), "/opt/PaddleNLP")).items():
        rehearsed.update(locations(rule, command))
    differing = {loc for loc in set(npu) | set(rehearsed) if npu.get(loc) != rehearsed.get(loc)}
    unexplained = sorted(loc for loc in differing if explain(loc, runtime, rehearsed.get(loc)) is None)
    assert not unexplained, f"differences not on the rehearsal's list: {unexplained}"
    listed = {d["key"] for d in rehearsal.describe(_resolved(project, checkout, runtime))}
    used: set = set()
    for loc in differing:
        key = explain(loc, runtime, rehearsed.get(loc))
        used.update(key if isinstance(key, tuple) else [key])
    assert listed == used, f"listed but changing nothing: {listed - used}; used but not listed: {used - listed}"
    assert str(checkout) in text
    for line in ("rehearsal=cpu: the npu target on CPU", "npu.cpu_shims.c_concat = true", "npu.parallel = "):
        assert line in text  # the dry-run prints the list


def _resolved(project: Path, checkout: Path, runtime: str) -> dict:
    """config.yaml as the rehearsal resolves it (what the dry-run printed its list from)."""
    import yaml

    from llamapipe.config import load

    raw = yaml.safe_load((project / "config.yaml").read_text())
    raw.update(target="npu", rehearsal="cpu", paddlenlp_src=str(checkout), runtime=runtime)
    (project / "rehearsal.yaml").write_text(yaml.safe_dump(raw))
    return load(str(project / "rehearsal.yaml"))


def _git_repo(root: Path) -> tuple[str, str]:
    """A local git repository holding a stand-in checkout: (file URL, commit)."""
    import subprocess

    fake_checkout(root)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return f"file://{root}", commit


def test_without_a_checkout_the_rehearsal_clones_the_pinned_commit(tmp_path):
    project = copy_project(tmp_path / "project")
    repo, commit = _git_repo(tmp_path / "upstream")
    (project / "pins.yaml").write_text(f"npu:\n  image:\n    paddlenlp_repo: {repo}\n    paddlenlp_commit: {commit}\n")
    args = ["--configfile", "pins.yaml", "--config", "target=npu", "rehearsal=cpu"]
    env = {rehearsal.CHECKOUT_ENV: ""}
    dry = snakemake(project, "-n", "-p", *args, env=env).stdout
    clone = project.resolve() / f".cache/PaddleNLP-{commit}"
    assert "rule paddlenlp_checkout" in dry and f"cd {clone}/llm" in dry
    snakemake(project, "--cores", "1", f".cache/PaddleNLP-{commit}", *args, env=env)
    assert (clone / "llm/run_finetune.py").is_file()
    import subprocess

    assert subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == commit
    assert not list(clone.parent.glob("*.tmp-*"))


def test_a_clone_that_cannot_reach_its_repository_names_the_variable(tmp_path):
    from llamapipe.npu.checkout import clone

    with pytest.raises(PipelineError, match=f"Set {rehearsal.CHECKOUT_ENV}=<dir>"):
        clone(f"file://{tmp_path}/nowhere", "4711e147a", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_clone_without_the_npu_scripts_is_refused(tmp_path):
    from llamapipe.npu.checkout import clone

    repo, commit = _git_repo(tmp_path / "upstream")
    with pytest.raises(PipelineError, match="lacks llm/some_script.py"):
        clone(repo, commit, str(tmp_path / "out"), required=("llm/some_script.py",))
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_checkout_is_refused(tmp_path):
    cfg = {"paddlenlp_src": str(tmp_path), "npu": {"image": {"paddlenlp_commit": "4711e147a",
                                                             "paddlenlp_repo": "r"}}}
    with pytest.raises(PipelineError, match="missing llm/run_finetune.py"):
        rehearsal.checkout_dir(cfg)


def test_rehearsal_needs_the_npu_target():
    from llamapipe.config import resolve

    with pytest.raises(PipelineError, match="use it with target=npu"):
        resolve({"target": "cpu", "rehearsal": "cpu"})


@pytest.mark.e2e
def test_sft_that_writes_nothing_fails_its_rule_loudly(tmp_path):
    """A run_finetune.py that exits 0 having saved nothing (the real launcher starts it)."""
    project = copy_project(tmp_path / "project")
    checkout = fake_checkout(tmp_path / "PaddleNLP")
    proc = snakemake(project, "--cores", "2", "results/sft", "--config", "target=npu", "rehearsal=cpu",
                     check=False, env={rehearsal.CHECKOUT_ENV: str(checkout)})
    log = (project / "results/logs/sft.log").read_text()
    assert proc.returncode != 0
    assert "this stand-in writes nothing" in log  # upstream's step ran, through the launcher
    assert "holds no final model" in log and "did training finish?" in log
    assert not (project / "results/sft").exists()


# --- end to end with upstream's own scripts ---------------------------------------------------

SHORT = "predict:\n  limit: null\nsft:\n  max_steps: 300\n  save_steps: 100\n  warmup_steps: 30\n"


def _rehearse(project: Path, extra_yaml: str = "") -> None:
    # one file: a second --configfile replaces the first (argparse), it does not add to it
    (project / "short.yaml").write_text(SHORT + extra_yaml)
    snakemake(project, "--cores", "2", "--configfile", "short.yaml", "--config", "target=npu", "rehearsal=cpu",
              timeout=1800)


def _check_run(project: Path, lora: bool) -> None:
    results = project / "results"
    upstream = [json.loads(x) for x in (results / "predictions.json.upstream.jsonl").read_text().splitlines()]
    predictions = json.loads((results / "predictions.json").read_text())
    dev = [json.loads(x) for x in (results / "data/dev.json").read_text().splitlines()]
    # predictions.json is upstream's predictor output, record for record
    assert [p["prediction"] for p in predictions] == [u["output"] for u in upstream]
    assert [p["src"] for p in predictions] == [d["src"] for d in dev]
    assert sum(bool(p["prediction"].strip()) for p in predictions) >= len(predictions) // 2
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["samples"] == len(dev) and metrics["rouge-l"] > 0
    log = [json.loads(x) for x in (results / "sft/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 301))  # one loss per step from the worker log
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    kept = sorted(int(p.name.split("-")[1]) for p in (results / "checkpoints/sft").glob("checkpoint-*"))
    assert kept == [200, 300]  # save_total_limit: 2 (one process: upstream keeps all, collect-sft prunes)
    assert (results / "wheels").is_dir() and list((results / "wheels").glob("paddlenlp_ops-*.whl"))
    smoke = json.loads((results / "smoke_collective.json").read_text())  # before sft, two gloo ranks
    assert smoke["ok"] and [r["all_reduce"]["got"] for r in smoke["ranks"]] == [3.0, 3.0]
    launch_log = (results / "logs/sft.log").read_text()
    assert "run_finetune.py" in launch_log and ("'--lora', 'true'" in launch_log) == lora
    prov = json.loads((results / "provenance.json").read_text())
    keys = {d["key"] for d in prov["rehearsal"]["differences"]}
    assert {"npu.device", "npu.cpu_shims.c_concat", "npu.parallel", "npu.inference_model"} <= keys
    assert prov["resume"]["exact"] is False and "not bitwise deterministic" in prov["resume"]["why"]
    assert (results / "inference/model.pdiparams").stat().st_size > 0
    merged_config = json.loads((results / "merged/config.json").read_text())
    assert merged_config["pad_token_id"] == 0 and merged_config["use_cache"] is False  # the guide's fix-up


@pytest.mark.e2e
@needs_checkout
def test_rehearsal_full_sft_end_to_end_with_upstream_scripts(tmp_path):
    project = copy_project(tmp_path / "project")
    _rehearse(project)
    _check_run(project, lora=False)


@pytest.mark.e2e
@needs_checkout
def test_rehearsal_lora_end_to_end_with_upstream_merge(tmp_path):
    project = copy_project(tmp_path / "project")
    _rehearse(project, "  lora: true\n  learning_rate: 1.0e-2\n")  # more keys of SHORT's sft section
    _check_run(project, lora=True)
    merge_log = (project / "results/logs/merge.log").read_text()
    assert "Begin to save merged model" in merge_log  # upstream's tools/merge_lora_params.py ran
    assert not (project / "results/merged.lora").exists()


@pytest.mark.e2e
@pytest.mark.container
@needs_checkout
def test_rehearsal_in_the_cpu_stage_image(tmp_path, docker_engine, cpu_image):
    project = copy_project(tmp_path / "project")
    checkout = tmp_path / "PaddleNLP"
    shutil.copytree(CHECKOUT, checkout)  # a copy the test may make read-only-owned
    env = docker_engine.env(**{rehearsal.CHECKOUT_ENV: str(checkout)})
    (project / "short.yaml").write_text(SHORT)
    args = ["--configfile", "short.yaml", "--config", "target=npu", "rehearsal=cpu", "runtime=container"]
    snakemake(project, "--cores", "2", *args, env=env, timeout=2400)
    _check_run(project, lora=False)
    sft = parse(shell_commands(snakemake(project, "-n", "-p", "-F", "results/sft", *args, env=env).stdout)["sft"])
    assert {"source": str(checkout), "target": "/opt/PaddleNLP", "read_only": True} in sft.spec["mounts"]
    assert sft.spec["devices"] == [] and sft.spec["image"] == cpu_image
    assert not docker_engine.client.containers.list(all=True, filters={"label": "llamapipe.rule"})


# The rehearsal's own values, flag by flag, on top of the NPU tables (what each listed item sets).
REHEARSAL_SFT = {
    "--device": ("cpu", "npu.device"), "--model_name_or_path": (f"{P}/results/model/base", "npu.model_name_or_path"),
    "--per_device_train_batch_size": ("8", "npu.sft: the cpu section"),
    "--gradient_accumulation_steps": ("1", "npu.sft"),
    "--max_steps": ("300", "npu.sft: the rehearsal's schedule"), "--learning_rate": ("0.003", "npu.sft"),
    "--warmup_steps": ("30", "npu.sft: the rehearsal's schedule"),
    "--save_steps": ("100", "npu.sft"), "--src_length": ("48", "npu.sft"), "--max_length": ("160", "npu.sft"),
    "--bf16": ("false", "npu.sft: float32"), "--fp16_opt_level": ("O1", "npu.fused.fp16_opt_level"),
    "--tensor_parallel_degree": ("2", "npu.parallel: the guide's layout at tensor parallel 2"),
    "--use_flash_attention": ("false", "npu.fused"), "--use_fused_rms_norm": ("false", "npu.fused"),
    "--pad_to_multiple_of": ("16", "npu.fused.pad_to_multiple_of"),
}
REHEARSAL_EXPORT = {"--device": ("cpu", ""), "--dtype": ("float32", ""), "--src_length": ("48", ""),
                    "--max_length": ("96", ""), "--inference_model": (None, ""), "--block_attn": (None, "")}
REHEARSAL_PREDICT = {**REHEARSAL_EXPORT, "--batch_size": ("8", "")}


def test_rehearsal_commands_exactly(tmp_path):
    from npu_commands import find_step, launcher, script_flags
    from test_npu_commands import (
        OURS_EXPORT,
        OURS_PREDICT,
        OURS_SFT,
        UPSTREAM_EXPORT,
        UPSTREAM_PREDICT,
        UPSTREAM_SFT,
        expected,
    )

    project = copy_project(tmp_path / "project").resolve()
    checkout = fake_checkout(tmp_path / "PaddleNLP")
    out = snakemake(project, "-n", "-p", "--config", "target=npu", "rehearsal=cpu",
                    env={rehearsal.CHECKOUT_ENV: str(checkout)}).stdout
    cmds = {k: parse(v) for k, v in shell_commands(out).items()}
    sft = find_step(cmds["sft"], "run_finetune.py")
    head, launch = launcher(sft, "run_finetune.py")
    assert launch == {"--nproc_per_node": "2", "--log_dir": f"{project}/results/logs/sft_launch"}
    assert script_flags(sft, "run_finetune.py") == expected(UPSTREAM_SFT, {**OURS_SFT, **REHEARSAL_SFT}, project)
    for rule, script, upstream, ours, extra in (
            ("export", "predict/export_model.py", UPSTREAM_EXPORT, OURS_EXPORT, REHEARSAL_EXPORT),
            ("predict", "predict/predictor.py", UPSTREAM_PREDICT, OURS_PREDICT, REHEARSAL_PREDICT)):
        step = find_step(cmds[rule], script)
        assert step[:3] == ["python", "-m", "llamapipe.npu.cpu_shims"] and step[4] == script
        assert step[3] == "--shims=" + ",".join(rehearsal.CPU_SHIMS)
        assert script_flags(step, script) == expected(upstream, {**ours, **extra}, project)
        assert ["python", "-c", "import paddlenlp_ops"] not in cmds[rule].steps  # the ops are not importable on CPU
        assert not any(s[:1] == ["source"] for s in cmds[rule].steps)
    assert all(c.spec is None for c in cmds.values())  # runtime local: no container
    assert f"cd {checkout}/llm".split() in cmds["sft"].steps
    assert head == ["python", "-u", "-m", "paddle.distributed.launch"]
    check, smoke = collective_check(cmds["smoke_collective"].steps[-1])
    logs = f"{project}/results/logs/smoke_collective_launch"
    assert check["--cards"] == "0,1"  # the two processes sft runs
    assert launcher(smoke, SMOKE_SCRIPT) == (head, {"--nproc_per_node": "2", "--log_dir": logs})
    assert cmds["smoke_collective"].steps[:-1] == [s for s in cmds["sft"].steps[:cmds["sft"].steps.index(sft)]
                                                   if not sft_only(s)]


def test_preflight_refuses_a_checkout_at_another_commit(tmp_path):
    from llamapipe.stages import preflight

    repo = tmp_path / "upstream"
    _git_repo(repo)
    params = {"min_free_disk_gb": 0, "target": "npu", "device": "cpu", "runtime": "local",
              "paddlenlp_checkout": str(repo), "paddlenlp_commit": "4711e147a185bb5d7876ee9617c0aee8dd321eed"}
    with pytest.raises(PipelineError, match="the config pins 4711e147a"):
        preflight.run(params, str(tmp_path / "preflight.json"))
    commit = subprocess_out(["git", "-C", str(repo), "rev-parse", "HEAD"])
    report = preflight.run({**params, "paddlenlp_commit": commit[:9]}, str(tmp_path / "preflight.json"))
    assert report["paddlenlp_checkout"] == {"path": str(repo), "commit": commit}


def subprocess_out(argv: list) -> str:
    import subprocess

    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.e2e
@needs_checkout
def test_rehearsal_two_node_stand_in_runs_upstream_finetune_data_parallel(tmp_path):
    """npu.nodes 2 on one host (npu.node_launcher local, a listed difference): two launchers of
    upstream's run_finetune.py meet at 127.0.0.1 and train as one world of two ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    project = copy_project(tmp_path / "project")
    (project / "short.yaml").write_text("sft:\n  max_steps: 30\n  save_steps: 10\n  warmup_steps: 5\n"
                                        f"npu:\n  nodes: 2\n  master: '127.0.0.1:{port}'\n"
                                        # one rank per node (the default layout would run tp 2 on each)
                                        "  parallel: {tensor_parallel_degree: 1, sequence_parallel: false}\n")
    proc = snakemake(project, "results/sft", "--cores", "2", "--configfile", "short.yaml", "--config", "target=npu",
                     "rehearsal=cpu", env={rehearsal.CHECKOUT_ENV: CHECKOUT}, timeout=1800)
    out = proc.stdout + proc.stderr
    assert "npu.node_launcher = \"local\"" in out  # printed with the other differences
    logs = project / "results/logs/sft_launch"
    for node in ("node0", "node1"):
        worker = (logs / node / "workerlog.0").read_text()
        assert "world_size: 2, distributed training: True" in worker and "data_parallel_degree          : 2" in worker
    ranks = sorted((logs / node / "envlog.0").read_text().split("PADDLE_TRAINER_ID=")[1].split()[0]
                   for node in ("node0", "node1"))
    assert ranks == ["0", "1"]
    log = [json.loads(x) for x in (project / "results/sft/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31))
    kept = sorted(p.name for p in (project / "results/checkpoints/sft").glob("checkpoint-*"))
    assert kept == ["checkpoint-20", "checkpoint-30"]  # two processes: upstream's own rotation


def _trained_losses(project: Path) -> dict[int, float]:
    """Upstream's per-step losses, as rank 0's worker log has them (a step logged twice, by a run
    killed after its checkpoint and by the rerun that resumed there: the rerun's)."""
    from llamapipe.stages.collect import parse_trainer_log

    lines = (project / "results/logs/sft_launch/workerlog.0").read_text(errors="replace").splitlines()
    return {e["step"]: e["loss"] for e in parse_trainer_log(lines)}


@pytest.mark.e2e
@needs_checkout
def test_rehearsal_tensor_parallel_resumes_after_a_kill_with_the_same_losses(tmp_path):
    """The guide's layout at tensor parallel 2: sft killed (SIGKILL to the whole job) after its
    step-20 checkpoint, then rerun, against the same 40 steps uninterrupted."""
    import signal
    import subprocess
    import time

    from conftest import SNAKEMAKE

    project = copy_project(tmp_path / "project")
    (project / "short.yaml").write_text("sft:\n  max_steps: 40\n  save_steps: 20\n  warmup_steps: 5\n")
    args = ["results/sft", "--configfile", "short.yaml", "--config", "target=npu", "rehearsal=cpu"]
    snakemake(project, "--cores", "2", *args, timeout=1200)
    whole = _trained_losses(project)
    assert sorted(whole) == list(range(1, 41))
    # asked again, sft trains from scratch (the finished run's checkpoints are set aside)
    started = time.time()
    proc = subprocess.Popen([*SNAKEMAKE, "--cores", "2", "-f", *args], cwd=project, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = project / "results/checkpoints/sft/checkpoint-20/.checkpoint_done"

    def saved_by_this_run() -> bool:  # not the first run's, which prepare-sft sets aside first
        return done.exists() and done.stat().st_mtime > started

    deadline = time.time() + 600
    while not saved_by_this_run() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert saved_by_this_run(), "no complete step-20 checkpoint before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = snakemake(project, "--cores", "2", "--rerun-incomplete", *args, timeout=1200)
    log = (project / "results/logs/sft.log").read_text()
    out = rerun.stdout + rerun.stderr
    assert "rule sft:" in out and "checkpoint-20" in log, out[-2000:]  # the rerun resumed from it
    resumed = _trained_losses(project)
    # upstream's Trainer, resumed inside the last epoch, checks max_steps only after a step: it
    # trains step 41 of 40 (README); steps 21-40 are the uninterrupted run's, to every digit
    assert sorted(resumed) == list(range(1, 42))
    after = {step: (whole[step], resumed[step]) for step in range(21, 41)}
    assert all(a == b for a, b in after.values()), after


@pytest.mark.parametrize("layout, procs, merge", [
    ({}, "2", None),
    ({"tensor_parallel_degree": 1, "sequence_parallel": False}, "1", None),
    ({"tensor_parallel_degree": 1, "sequence_parallel": False, "sharding_parallel_degree": 2}, "2", None),
    ({"tensor_parallel_degree": 1, "sequence_parallel": False, "pipeline_parallel_degree": 2}, "2", "0"),
    ({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}, "4", "2"),
], ids=["default-tp2", "one-process", "sharding2", "pp2", "tp2-pp2"])
def test_a_pinned_layout_is_rehearsed_one_process_per_rank(tmp_path, layout, procs, merge):
    """A layout given on the command line runs as pinned; with pipeline parallel, upstream's
    merge_tp_and_pp_params.py joins the per-stage final save before collect-sft."""
    from npu_commands import find_step, launcher, script_flags

    project = copy_project(tmp_path / "project").resolve()
    checkout = fake_checkout(tmp_path / "PaddleNLP")
    pin = ["npu={parallel: {" + ", ".join(f"{k}: {str(v).lower()}" for k, v in layout.items()) + "}}"] if layout else []
    out = snakemake(project, "-n", "-p", "results/sft", "--config", "target=npu", "rehearsal=cpu", *pin,
                    env={rehearsal.CHECKOUT_ENV: str(checkout)}).stdout
    sft = parse(shell_commands(out)["sft"])
    run = find_step(sft, "run_finetune.py")
    assert launcher(run, "run_finetune.py")[1]["--nproc_per_node"] == procs
    for key, value in layout.items():
        assert script_flags(run, "run_finetune.py")[f"--{key}"] == str(value).lower()
    merges = [s for s in sft.steps if "tools/merge_tp_and_pp_params.py" in s]
    if merge is None:
        assert not merges
    else:
        (step,) = merges
        flags_ = script_flags(step, "tools/merge_tp_and_pp_params.py")
        assert flags_ == {"--model_name_or_path": f"{project}/results/checkpoints/sft", "--device": "cpu",
                          "--pipeline_parallel_degree": "2", "--tensor_parallel_degree": merge}
        assert sft.steps.index(step) == sft.steps.index(run) + 1  # before collect-sft


@pytest.mark.e2e
@needs_checkout
def test_rehearsal_pipeline_parallel_end_to_end(tmp_path):
    """pp 2: upstream's final save is one file per stage; its merge_tp_and_pp_params.py joins them
    and the stages after sft take the one model (without it there is no single model file to load)."""
    project = copy_project(tmp_path / "project")
    (project / "pp.yaml").write_text(
        "npu:\n  parallel: {tensor_parallel_degree: 1, sequence_parallel: false, pipeline_parallel_degree: 2}\n"
        "sft:\n  max_steps: 60\n  save_steps: 30\n  warmup_steps: 5\n")
    snakemake(project, "--cores", "2", "results/metrics.json", "--configfile", "pp.yaml", "--config", "target=npu",
              "rehearsal=cpu", timeout=1800)
    ckpt = project / "results/checkpoints/sft"
    assert (ckpt / "model_state.pp00.pdparams").is_file() and (ckpt / "model_state.pp01.pdparams").is_file()
    import paddle

    merged = paddle.load(str(project / "results/sft/model_state.pdparams"), return_numpy=True)
    stages = {**paddle.load(str(ckpt / "model_state.pp00.pdparams"), return_numpy=True),
              **paddle.load(str(ckpt / "model_state.pp01.pdparams"), return_numpy=True)}
    assert sorted(merged) == sorted(stages) and all((merged[k] == stages[k]).all() for k in stages)
    assert json.loads((project / "results/metrics.json").read_text())["samples"] > 0
