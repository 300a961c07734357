"""What a user brings from outside the project (their weights, their data archive) reaches the
stage that reads it: mounted read-only into its container, named by an absolute path, its shape
read by the planner, checked by preflight."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from llamapipe.config import deep_merge, load
from llamapipe.npu import ascend_checks
from llamapipe.runners.commands import rule_command

L13_CONFIG = {"model_type": "llama", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "vocab_size": 32000, "intermediate_size": 13824,
              "max_position_embeddings": 4096}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with the user's model directory and archive kept outside it."""
    proj = tmp_path / "project"
    shutil.copytree(ROOT, proj, ignore=shutil.ignore_patterns(".venv", ".git", "results", ".snakemake", "data",
                                                               ".cache", "__pycache__"))
    monkeypatch.chdir(proj)  # Snakemake's working directory: relative paths are the project's
    outside = tmp_path / "outside"
    (outside / "llama").mkdir(parents=True)
    (outside / "llama" / "config.json").write_text(json.dumps(L13_CONFIG))
    shutil.copy(ROOT / "assets" / "AdvertiseGen-sample.tar.gz", outside / "data.tar.gz")
    return proj


def _cfg(project: Path, **over) -> dict:
    raw = deep_merge(yaml.safe_load((project / "config.yaml").read_text()), over)
    (project / "over.yaml").write_text(yaml.safe_dump(raw))
    return load(str(project / "over.yaml"))


def _container(cmd: str) -> tuple[dict, list[str]]:
    argv = shlex.split(cmd)
    assert argv[:3] == ["llamapipe", "container-run", "--spec"], argv[:3]
    return json.loads(argv[3]), argv[5:]


def _ro(path) -> dict:
    return {"source": str(path), "target": str(path), "read_only": True}


def test_a_model_directory_outside_the_project_is_mounted_read_only_where_upstream_reads_it(project):
    model = project.parent / "outside" / "llama"
    cfg = _cfg(project, target="npu", npu={"model_name_or_path": str(model)})
    for rule in ("sft", "merge"):
        spec, _ = _container(rule_command(rule, cfg, str(project)))
        assert _ro(model) in spec["mounts"], rule
    spec, argv = _container(rule_command("sft", cfg, str(project)))
    script = argv[-1]
    assert f"--model_name_or_path {model} " in script
    for rule in ("export", "predict", "download_data"):
        spec, _ = _container(rule_command(rule, cfg, str(project)))
        assert _ro(model) not in spec["mounts"], rule  # only the stages that read it


def test_a_relative_model_directory_is_the_projects_before_cd(project):
    (project / "models" / "llama").mkdir(parents=True)
    (project / "models" / "llama" / "config.json").write_text(json.dumps(L13_CONFIG))
    cfg = _cfg(project, target="npu", npu={"model_name_or_path": "models/llama"})
    spec, argv = _container(rule_command("sft", cfg, str(project)))
    assert f"--model_name_or_path {project}/models/llama " in argv[-1]  # upstream runs after `cd llm/`
    assert [m for m in spec["mounts"] if "models" in m["source"]] == []  # inside the project mount
    outside = _cfg(project, target="npu", npu={"model_name_or_path": "../outside/llama"})
    spec, argv = _container(rule_command("sft", outside, str(project)))
    assert _ro(project.parent / "outside" / "llama") in spec["mounts"]
    assert f"--model_name_or_path {project.parent}/outside/llama " in argv[-1]


def test_a_hub_id_is_passed_as_is_and_mounts_nothing(project):
    cfg = _cfg(project, target="npu")
    spec, argv = _container(rule_command("sft", cfg, str(project)))
    assert "--model_name_or_path meta-llama/Llama-2-13b " in argv[-1]
    ours = {str(ROOT / "src"), "/usr/local/Ascend/driver", "/usr/local/bin/npu-smi", "/usr/local/dcmi"}
    assert [m for m in spec["mounts"] if m["read_only"] and m["source"] not in ours] == []


def test_the_plan_reads_a_local_model_directorys_own_config(project):
    """No npu.model_config: the planner reads the directory's config.json (it used to ask for a
    flag of `llamapipe plan`)."""
    model = project.parent / "outside" / "llama"
    cfg = _cfg(project, target="npu", npu={"model_name_or_path": str(model)})
    plan = shlex.split(rule_command("plan", cfg, str(project)))
    assert plan[plan.index("--model-config") + 1] == str(model / "config.json")
    (model / "config.json").write_text(json.dumps({**L13_CONFIG, "num_attention_heads": 12,
                                                   "num_key_value_heads": 12, "hidden_size": 768}))
    with pytest.raises(Exception, match=r"does not divide num_attention_heads of npu.model_config \(12\)"):
        _cfg(project, target="npu", npu={"model_name_or_path": str(model), "parallel": {"tensor_parallel_degree": 8}})


@pytest.mark.parametrize("over", [{}, {"target": "npu"}], ids=["cpu-container", "npu"])
def test_a_data_archive_outside_the_project_is_mounted_into_download_data(project, over):
    archive = project.parent / "outside" / "data.tar.gz"
    copied = yaml.safe_load((project / "config.yaml").read_text())["data"]["sha256"]  # the sample's pin
    local = {"url": f"file://{archive}", "sha256": copied}
    # target npu trains on npu.data; this archive is a copy of the bundled sample: asked for explicitly
    cfg = _cfg(project, runtime="container", data={**local, "allow_sample": True}, npu={"data": local}, **over)
    spec, _ = _container(rule_command("download_data", cfg, str(project)))
    assert _ro(archive) in spec["mounts"]
    spec, _ = _container(rule_command("prepare_data", cfg, str(project)))
    assert _ro(archive) not in spec["mounts"]


def test_preflight_names_model_files_the_containers_uid_cannot_read():
    """Run as another uid (the check's process is the containers' uid): a weights file only its
    owner can read is named, with the fix."""
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="llamapipe-model-"))  # pytest's tmp dirs are private to root
    top.chmod(0o755)
    model = top / "llama"
    model.mkdir()
    for name in ("config.json", "tokenizer_config.json", "model_state.pdparams"):
        (model / name).write_text("{}")
    (model / "model_state.pdparams").chmod(0o600)
    code = ("import sys; from llamapipe.npu import ascend_checks as ac; "
            f"r = ac.check_model(ac.Host(), {str(model)!r}); print(r['ok'], r['verdict'])")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, env=env)
    if proc.returncode and "Operation not permitted" in proc.stderr:
        pytest.skip("cannot switch uid here (not root)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False ") and "model_state.pdparams not readable by uid 65534" in proc.stdout
    assert "chmod -R a+rX" in proc.stdout
    assert ascend_checks.check_model(ascend_checks.Host(), str(model))["ok"] or os.getuid() != 0
    shutil.rmtree(top)


CHECKOUT = os.environ.get("LLAMAPIPE_PADDLENLP_SRC")


@pytest.mark.e2e
@pytest.mark.container
@pytest.mark.skipif(not CHECKOUT, reason="set LLAMAPIPE_PADDLENLP_SRC=<PaddleNLP checkout at the pinned commit>")
def test_rehearsal_in_containers_trains_the_users_model_on_the_users_archive(tmp_path, docker_engine, cpu_image):
    """The npu DAG in the CPU stage image (rehearsal, runtime=container) with a model directory and a
    data archive the user keeps outside the project: upstream's scripts read both inside the containers."""
    from conftest import copy_project, snakemake

    project = copy_project(tmp_path / "project")
    snakemake(project, "--cores", "2", "results/model/base")  # the user's own small model, made beforehand
    outside = tmp_path / "outside"
    shutil.copytree(project / "results" / "model" / "base", outside / "llama")
    shutil.copy(ROOT / "assets" / "AdvertiseGen-sample.tar.gz", outside / "data.tar.gz")
    for made in ("results", "data", ".snakemake"):
        shutil.rmtree(project / made, ignore_errors=True)
    checkout = tmp_path / "PaddleNLP"
    shutil.copytree(CHECKOUT, checkout)
    (project / "mine.yaml").write_text(yaml.safe_dump({
        "npu": {"model_name_or_path": str(outside / "llama")},
        "data": {"url": f"file://{outside / 'data.tar.gz'}"},
        "sft": {"max_steps": 20, "save_steps": 10, "warmup_steps": 2}}))
    env = docker_engine.env(LLAMAPIPE_PADDLENLP_SRC=str(checkout))
    args = ["--configfile", "mine.yaml", "--config", "target=npu", "rehearsal=cpu", "runtime=container"]
    snakemake(project, "--cores", "2", "results/predictions.json", *args, env=env, timeout=2400)
    dev = (project / "results" / "data" / "dev.json").read_text().splitlines()
    assert len(json.loads((project / "results" / "predictions.json").read_text())) == len(dev) > 0
    sft_log = (project / "results" / "logs" / "sft.log").read_text()
    assert str(outside / "llama") in sft_log  # upstream's run_finetune.py was given the user's directory
    assert not (project / "results" / "model" / "base" / "model_state.pdparams").exists()  # nothing built
    dry = snakemake(project, "-n", "-p", "-F", "results/predictions.json", *args, env=env).stdout
    assert json.dumps(_ro(outside / "llama"), sort_keys=True) in dry
    assert json.dumps(_ro(outside / "data.tar.gz"), sort_keys=True) in dry
