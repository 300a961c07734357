"""The launcher commands of sft on both targets (one builder, llamapipe.scaleout.launch), the one-host
node supervisor (llamapipe.scaleout.local_nodes, real processes) and the config typing of --config."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from llamapipe.config import deep_merge, load, validation
from llamapipe.npu import scripts
from llamapipe.runners import commands
from llamapipe.scaleout import launch

PATHS = {"sft": "results/sft", "sft_checkpoints": "results/checkpoints/sft",
         "sft_launch_logs": "results/logs/sft_launch", "data": "results/data", "base_model": "results/model/base"}
SFT_ARGV = ["llamapipe", "sft", "--params", "{}", "--seed", "42", "--threads", "2", "--manifest", "m.json",
            "--train", "t.json", "--base", "b", "--out", "results/sft", "--ckpt-dir", "results/checkpoints/sft"]
CLI = f"{commands.package_src_dir()}/llamapipe/entrypoints/cli_script.py"


@pytest.fixture(autouse=True)
def in_project_dir(monkeypatch):
    monkeypatch.chdir(ROOT)  # config.yaml's data.url is relative to the project


def _cfg(tmp_path, **over) -> dict:
    raw = deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), over)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(str(path))


def _sft(cfg) -> list[str]:
    return shlex.split(commands.stage_command("sft", cfg, PATHS, "/p", SFT_ARGV, threads=2))


def test_one_process_is_the_plain_stage(tmp_path):
    assert _sft(_cfg(tmp_path)) == SFT_ARGV


def test_two_processes_run_our_stage_under_the_launcher_with_the_threads_shared(tmp_path):
    argv = _sft(_cfg(tmp_path, sft={"processes": 2}))
    inner = list(SFT_ARGV[1:])
    inner[inner.index("--threads") + 1] = "1"  # two processes on the rule's two threads
    assert argv == ["python", "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                    "--log_dir", "results/logs/sft_launch", "--", CLI, *inner]


def test_two_local_nodes_run_under_the_supervisor_with_a_log_dir_each(tmp_path):
    cfg = _cfg(tmp_path, sft={"nodes": 2, "master": "127.0.0.1:36677"})
    argv = _sft(cfg)
    assert argv[:6] == ["python", "-m", "llamapipe.scaleout.local_nodes", "--nodes", "2", "--"]
    assert argv[6:17] == ["python", "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "1",
                          "--log_dir", "results/logs/sft_launch/node@NODE@", "--nnodes", "2", "--master"]
    assert argv[17] == "127.0.0.1:36677"
    assert argv[argv.index("--threads") + 1] == "1"  # both nodes' processes share this host's two


def _steps(script: str) -> list[list[str]]:
    """The commands of a bash -c script, split at its top-level ``;`` (quotes respected)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    steps: list[list[str]] = [[]]
    for token in lexer:
        steps.append([]) if token == ";" else steps[-1].append(token)
    return steps


def test_cpu_srun_starts_one_launcher_per_node_of_the_job(tmp_path):
    cfg = _cfg(tmp_path, sft={"nodes": 2, "node_launcher": "srun"})
    script = _sft(cfg)
    assert script[:2] == ["bash", "-c"]
    steps = _steps(script[2])
    assert steps[0] == ["set", "-eo", "pipefail"]
    # the master: this node's address as the launcher computes it (launch/context/node.py), so
    # the launcher on this node serves the rendezvous
    export = script[2].split("; ")[3]
    master = subprocess.run(["bash", "-c", f'{export}; echo "$LLAMAPIPE_MASTER"'], capture_output=True, text=True)
    expected = socket.gethostbyname(socket.getfqdn())
    assert master.stdout.strip() == f"{expected}:{launch.SRUN_MASTER_PORT}", master.stderr
    srun = steps[5]
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--overlap"]
    assert srun[6:8] == ["bash", "-c"]  # each task's own shell expands its $SLURM_NODEID
    per_task = shlex.split(srun[8])
    assert per_task[:7] == ["python", "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "1", "--log_dir"]
    assert per_task[7:13] == ["results/logs/sft_launch/node$SLURM_NODEID", "--nnodes", "$SLURM_NNODES",
                              "--master", "$LLAMAPIPE_MASTER", "--"]
    assert '"results/logs/sft_launch/node$SLURM_NODEID"' in srun[8]  # double-quoted: expanded per task
    assert per_task[per_task.index("--threads") + 1] == "2"  # one launcher per node: the node's threads


def test_srun_on_one_node_is_srun_over_the_jobs_one_node(tmp_path):
    """sft.node_launcher srun with one node: the same recipe (what the one-node test cluster runs)."""
    steps = _steps(_sft(_cfg(tmp_path, sft={"processes": 2, "node_launcher": "srun"}))[2])
    assert steps[5][:6] == ["srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                            "--overlap"]
    per_task = shlex.split(steps[5][8])
    assert per_task[4:6] == ["--nproc_per_node", "2"] and "$SLURM_NNODES" in per_task


def test_srun_outside_a_job_and_a_wrong_node_count_fail_with_the_reason(tmp_path):
    script = _sft(_cfg(tmp_path, sft={"nodes": 2, "node_launcher": "srun"}))
    guard = "; ".join(script[2].split("; ")[:3])
    outside = subprocess.run(["bash", "-c", guard], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
    wrong = subprocess.run(["bash", "-c", guard], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_NNODES": "1"})
    assert wrong.returncode == 2 and "the job has 1 node(s), the layout 2: ask for --nodes=2" in wrong.stderr


def test_npu_nodes_under_srun_run_sfts_script_per_node_and_collect_once(tmp_path):
    cfg = _cfg(tmp_path, target="npu", npu={"nodes": 2, "node_launcher": "srun"})
    script = shlex.split(commands.stage_command("sft", cfg, PATHS, "/p", SFT_ARGV, threads=8))
    steps = _steps(script[2])
    before, srun = steps[5], steps[6]
    # a finished run's checkpoints are set aside once, before srun (not by every node)
    assert before[:3] == ["llamapipe", "container-run", "--spec"] and "prepare-sft" in before[-1]
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--overlap"]
    assert srun[6:9] == ["llamapipe", "container-run", "--spec"]
    spec = json.loads(srun[9])
    assert spec["pass_env"] == ["SLURM_NODEID", "SLURM_NNODES", "LLAMAPIPE_MASTER"]
    per_node = srun[srun.index("--") + 1:]
    assert per_node[:2] == ["bash", "-c"]
    launch_line = next(s for s in per_node[2].split("; ") if "paddle.distributed.launch" in s)
    assert ('--devices 0,1,2,3,4,5,6,7 --log_dir "/p/results/logs/sft_launch/node$SLURM_NODEID" '
            '--nnodes "$SLURM_NNODES" --master "$LLAMAPIPE_MASTER" run_finetune.py') in launch_line
    assert "collect-sft" not in per_node[2] and "prepare-sft" not in per_node[2]  # once, not on every node
    after = steps[7]
    assert after[:3] == ["llamapipe", "container-run", "--spec"] and "collect-sft" in after[-1]
    assert "pass_env" not in json.loads(after[3])


def test_smoke_collective_stays_on_one_node(tmp_path):
    cfg = _cfg(tmp_path, target="npu", npu={"nodes": 2, "node_launcher": "srun"})
    paths = {**PATHS, "smoke_collective": "results/smoke.json", "smoke_launch_logs": "results/logs/smoke"}
    script = scripts.smoke_collective_script(cfg, paths, "/p", launch.npu_layout(cfg))[-1]
    assert "--nnodes" not in script and "--log_dir /p/results/logs/smoke " in script


def test_shell_line_leaves_only_variable_tokens_expandable():
    assert launch.shell_line(["a b", "x/node$SLURM_NODEID", "$(rm -rf /)", "$HOME;ls"]) == (
        "'a b' \"x/node$SLURM_NODEID\" '$(rm -rf /)' '$HOME;ls'")


def test_nested_cli_values_are_typed_by_the_schema():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    given = {"sft": {"processes": "2", "master": "127.0.0.1:1", "lora": "true", "learning_rate": "3e-3"},
             "npu": {"nodes": "2", "master": "null"}, "data": {"max_train": "null"}}
    schema = validation.with_overlays(schema)
    typed = validation.coerce(given, schema)
    assert typed["sft"] == {"processes": 2, "master": "127.0.0.1:1", "lora": True, "learning_rate": 3e-3}
    assert typed["npu"] == {"nodes": 2, "master": "null"}  # a string key keeps its string
    assert typed["data"] == {"max_train": None}
    assert validation.coerce({"sft": {"processes": "two"}}, schema) == {"sft": {"processes": "two"}}


# --- llamapipe.scaleout.local_nodes: real processes -------------------------------------------------


def _nodes(tmp_path, *script, nodes=2, timeout=60):
    return subprocess.run([sys.executable, "-m", "llamapipe.scaleout.local_nodes", "--nodes", str(nodes), "--",
                           "bash", "-c", *script], capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_local_nodes_runs_each_node_with_its_index(tmp_path):
    done = _nodes(tmp_path, "echo hello from @NODE@ > out.@NODE@; echo node @NODE@ ok")
    assert done.returncode == 0, done.stderr
    assert sorted(p.read_text() for p in tmp_path.glob("out.*")) == ["hello from 0\n", "hello from 1\n"]
    assert "[node0] node 0 ok" in done.stdout and "[node1] node 1 ok" in done.stdout


def test_a_failing_node_stops_the_others_and_gives_its_exit_code(tmp_path):
    started = time.time()
    # each "launcher" stops its worker on SIGTERM, as paddle.distributed.launch does
    # (node 1 fails once node 0's worker runs)
    done = _nodes(tmp_path, 'if [ @NODE@ = 1 ]; then while [ ! -s sleeper.0 ]; do sleep 0.1; done; exit 7; fi; '
                            'trap \'kill $w; exit 143\' TERM; sleep 60 & w=$!; echo $w > sleeper.@NODE@; wait')
    assert done.returncode == 7
    assert "node 1 exited with 7; stopping the others" in done.stderr
    assert time.time() - started < 30  # node 0's sleep 60 did not hold it
    sleeper = Path(f"/proc/{int((tmp_path / 'sleeper.0').read_text())}/stat")
    assert not sleeper.exists() or sleeper.read_text().split(") ")[1][0] == "Z"  # its worker went too (or a zombie)


def test_a_command_without_the_node_placeholder_is_refused(tmp_path):
    done = _nodes(tmp_path, "true")
    assert done.returncode == 2 and "names no @NODE@" in done.stderr
