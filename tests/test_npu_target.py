"""target: npu without Ascend hardware: the DAG, the exact commands, and the config checks.

The dry-run is what CI can check on a machine with no NPU and no engine; the command lines
must carry the guide's N1C8 settings exactly as upstream's llama_npu_sft_N1C8.sh passes them.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import copy_project, planned_jobs, snakemake
from llamapipe.config import resolve
from llamapipe.core.errors import PipelineError
from llamapipe.npu import upstream_args
from llamapipe.runners import commands
from llamapipe.scaleout import launch

NPU_RULES = ["preflight", "plan", "pull_image", "build_image", "preflight_image", "build_ops", "download_data",
             "prepare_data", "init_model", "smoke_collective", "sft", "merge", "export", "predict"]


@pytest.fixture(scope="module")
def npu_project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("npu") / "project")


def dry_run(project, *extra):
    out = snakemake(project, "-n", "-p", "results/metrics.json", "--config", "target=npu", *extra).stdout
    return out


def shell_commands(out: str) -> dict:
    """rule name -> its printed shell command (dry-run -p)."""
    cmds, rule = {}, None
    for block in re.split(r"\n(?=\[)", out):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        c = re.search(r"^Shell command: (.*?)(?=\n\S|\Z)", block, re.M | re.S)
        if m and c:
            rule = m.group(1)
            cmds[rule] = c.group(1)
    return cmds


def script_of(command: str) -> str:
    """The bash -c script inside a container-run command, unquoted."""
    argv = shlex.split(command.split(" > results/logs/")[0])
    return argv[argv.index("-c") + 1]


def rule_edges(project, *extra):
    dot = snakemake(project, "results/metrics.json", "--rulegraph", "dot", "--config", "target=npu", *extra).stdout
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot, re.M))
    return {(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M)}


def test_npu_dry_run_plans_the_guides_whole_dag(npu_project):
    cmds = shell_commands(dry_run(npu_project))
    assert set(cmds) == set(NPU_RULES) | {"evaluate"}


def test_npu_rule_order(npu_project):
    edges = rule_edges(npu_project)
    for edge in [("preflight", "pull_image"), ("pull_image", "build_image"), ("build_image", "build_ops"),
                 ("build_ops", "export"), ("build_ops", "predict"), ("build_image", "sft"),
                 ("build_image", "smoke_collective"), ("smoke_collective", "sft"),
                 ("prepare_data", "sft"), ("init_model", "sft"), ("sft", "merge"), ("merge", "export"),
                 ("export", "predict"), ("predict", "evaluate"), ("preflight", "plan"),
                 ("build_image", "preflight_image"), ("preflight_image", "build_ops"), ("preflight_image", "sft"),
                 ("preflight_image", "download_data")]:
        assert edge in edges, edge


def test_smoke_collective_runs_before_sft_on_npu_only(npu_project):
    out = dry_run(npu_project)
    order = re.findall(r"^rule (\w+):", out, re.M)
    assert order.index("smoke_collective") < order.index("sft")
    sft = re.search(r"^rule sft:\n    input: (.*)$", out, re.M).group(1).split(", ")
    assert "results/smoke_collective.json" in sft
    cpu = planned_jobs(npu_project, "results/metrics.json")  # config.yaml's target: cpu
    assert "sft" in cpu and "smoke_collective" not in cpu


def test_npu_resources_keep_jobs_off_the_same_cards(npu_project):
    out = dry_run(npu_project)
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):.*?(?=\n\[|\Z)", out, re.S)}
    assert "npu=8" in blocks["sft"]
    assert "npu=8" in blocks["smoke_collective"]
    assert "npu=1" in blocks["predict"]


def test_devices_override_maps_cards(npu_project):
    (npu_project / "tp4.yaml").write_text(  # 13b does not fit 4 cards; 7b does
        "npu:\n  model_name_or_path: meta-llama/Llama-2-7b\n  parallel:\n    tensor_parallel_degree: 4\n")
    sft = shell_commands(dry_run(npu_project, "devices=0,1,2,3", "--configfile", "tp4.yaml"))["sft"]
    assert "--devices 0,1,2,3 " in sft
    assert '"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"' in sft
    assert "/dev/davinci4" not in sft


def test_bad_npu_layout_stops_before_any_job(npu_project):
    proc = snakemake(npu_project, "-n", "--config", "target=npu", "devices=0,1,2,3",
                     "npu={parallel: {tensor_parallel_degree: 8}}", check=False)
    assert proc.returncode != 0
    assert "does not divide" in proc.stdout + proc.stderr


def _cfg(**npu_over):
    """config.yaml with target npu (and npu.* overrides), defaults filled, not yet resolved."""
    import yaml

    from conftest import ROOT
    from llamapipe.config import validation

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["target"] = "npu"
    for key, value in npu_over.items():
        raw["npu"][key] = value
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    return validation.checked(raw, validation.with_overlays(schema))


def test_lora_switch_uses_the_upstream_lora_arguments():
    cfg = resolve(_cfg())
    cfg["sft"]["lora"] = True
    args = upstream_args.finetune_args(cfg, "meta-llama/Llama-2-13b", "/p/results/data", "/p/ckpt")
    assert args[-4:] == ["--lora", "true", "--lora_rank", "32"]
    assert "--sharding" not in args  # llama_npu_lora_N1C8.sh trains without sharding


def test_pretrain_switch_runs_run_pretrain():
    cfg = resolve(_cfg(pretrain={"enabled": True, "input_dir": "data/pre", "split": "949,50,1"}))
    cmd = commands.stage_command("sft", cfg, {"data": "results/data", "sft": "results/sft",
                                              "base_model": "results/model/base",
                                              "pretrain_data_cache": "results/cache/pretrain_data",
                                              "sft_checkpoints": "results/checkpoints/sft",
                                              "sft_launch_logs": "results/logs/sft_launch"}, "/p", ["llamapipe", "sft"])
    argv = shlex.split(shlex.split(cmd)[-1].split("; ")[-2])  # the launch step of the bash -c script
    assert (argv[argv.index("run_pretrain.py") - 2:argv.index("run_pretrain.py")]
            == ["--log_dir", "/p/results/logs/sft_launch"])
    opts = dict(zip(argv[argv.index("run_pretrain.py") + 1::2], argv[argv.index("run_pretrain.py") + 2::2]))
    # input_dir is the project's, not relative to the checkout's llm/ where the script runs
    assert opts["--input_dir"] == "/p/data/pre" and opts["--max_seq_length"] == "4096"
    assert opts["--model_name_or_path"] == opts["--tokenizer_name_or_path"] == "meta-llama/Llama-2-13b"


def test_multi_node_under_srun_takes_nodes_and_master_from_the_job():
    """srun starts this line on every node: the node count, node id and master come from the job
    (double-quoted, so the per-node shell expands them); a configured ips list is passed on."""
    from llamapipe.scaleout.launch import shell_line

    cfg = resolve(_cfg(nodes=2, master="10.0.0.1:8090", ips="10.0.0.1,10.0.0.2", node_launcher="srun"))
    argv = launch.launch_argv(launch.npu_layout(cfg), ["run_finetune.py"], "logs")
    assert shell_line(argv) == (
        'python -u -m paddle.distributed.launch --devices 0,1,2,3,4,5,6,7 --log_dir "logs/node$SLURM_NODEID" '
        '--nnodes "$SLURM_NNODES" --master "$LLAMAPIPE_MASTER" --ips 10.0.0.1,10.0.0.2 run_finetune.py')


def test_predict_longer_than_export_is_refused():
    raw = _cfg()
    raw["npu"]["predict"]["max_new_tokens"] = 4096
    with pytest.raises(PipelineError, match="baked in at export"):
        resolve(raw)


def test_cpu_container_runtime_wraps_our_cli():

    from conftest import ROOT
    from llamapipe.config import load

    cfg = load(str(ROOT / "config.yaml"))
    cfg["runtime"] = "container"
    cmd = commands.stage_command("predict", cfg, {}, "/proj", ["llamapipe", "predict", "--threads", "2"], threads=2)
    argv = shlex.split(cmd)
    assert argv[:3] == ["llamapipe", "container-run", "--spec"]
    assert argv[4:] == ["--", "python", "-m", "llamapipe", "predict", "--threads", "2"]
    spec = json.loads(argv[3])
    assert spec["image"] == "llamapipe-cpu:test" and spec["devices"] == [] and spec["network"] == "none"
    assert spec["env"]["PYTHONPATH"] == commands.package_src_dir() and spec["env"]["OMP_NUM_THREADS"] == "2"
    assert ({"source": commands.package_src_dir(), "target": commands.package_src_dir(), "read_only": True}
            in spec["mounts"])


def test_layout_that_cannot_fit_stops_before_any_job_with_the_numbers(npu_project):
    (npu_project / "tp1.yaml").write_text(
        "npu:\n  parallel:\n    tensor_parallel_degree: 1\n    sequence_parallel: false\n    sharding: ''\n")
    proc = snakemake(npu_project, "-n", "--config", "target=npu", "--configfile", "tp1.yaml", check=False)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "does not fit" in message and "GB per card" in message and "57.6 GB are usable" in message
    assert not (npu_project / "results").exists()


def test_parallel_auto_takes_the_planners_layout_and_writes_plan_json(npu_project):
    (npu_project / "auto.yaml").write_text("npu:\n  parallel: auto\n")
    args = ["--config", "target=npu", "--configfile", "auto.yaml"]
    sft = script_of(shell_commands(snakemake(npu_project, "-n", "-p", "results/metrics.json", *args).stdout)["sft"])
    assert "--tensor_parallel_degree 8" in sft and "--pipeline_parallel_degree 1" in sft
    # the plan rule runs after preflight (its measured HBM caps the memory): a preflight that measured
    # nothing (as on a host without cards) leaves the configured 64 GB
    (npu_project / "results").mkdir(exist_ok=True)
    (npu_project / "results/preflight.json").write_text('{"target": "npu", "problems": []}')
    snakemake(npu_project, "results/plan.json", "--cores", "1", *args)
    plan = json.loads((npu_project / "results/plan.json").read_text())
    assert (plan["chosen"]["tp"], plan["chosen"]["pp"]) == (8, 1)
    assert any((c["tp"], c["pp"]) == (8, 1) for c in plan["fitting"])


def test_multi_node_plan_covers_all_cards():
    from llamapipe.config.parallel import apply_plan

    cfg = resolve(_cfg(nodes=2, master="10.0.0.1:8090", ips="10.0.0.1,10.0.0.2", parallel="auto",
                       node_launcher="srun"))
    result = apply_plan(cfg)
    assert result.setup.total_cards == 16
    assert result.chosen.layout.world == 16
