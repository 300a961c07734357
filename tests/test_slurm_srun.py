"""The srun recipe for sft (``node_launcher: srun``) on the real one-node SLURM cluster.

sft runs as a SLURM job through profiles/slurm (the pinned executor plugin); inside it our
generated script checks the job's node count, takes this node's address as the master, and
``srun`` starts the launcher once per node of the job (one here: the test cluster has one node)
with ``--nnodes $SLURM_NNODES --master $LLAMAPIPE_MASTER``, two data-parallel processes under it.
What only a cluster of several nodes shows (ranks across hosts) is not tested here.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from conftest import copy_project, snakemake
from llamapipe.scaleout.launch import SRUN_MASTER_PORT
from test_slurm import SMALL, SUBMITTED, cpu_settings, sacct_jobs, slurm_logs

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]


def test_sft_by_srun_inside_a_slurm_job(slurm_cluster, tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "small.yaml").write_text(
        SMALL.replace("sft: {", "sft: {processes: 2, per_device_train_batch_size: 4, node_launcher: srun, "))
    args = ("--configfile", "config.yaml", "small.yaml", "--", "results/sft")
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster), *args,
                     check=False, timeout=1500, env=slurm_cluster.env())
    assert proc.returncode == 0, f"{proc.stderr[-5000:]}{slurm_logs(project)}\n{slurm_cluster.log_tails()}"
    log = (project / "results/logs/sft.log").read_text()
    master = socket.gethostbyname(socket.getfqdn())
    assert re.search(rf"sft: 1 nodes \(\S+\), master {re.escape(master)}:{SRUN_MASTER_PORT}", log), log[-3000:]
    summary = json.loads((project / "results/sft/train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 20
    # the launcher ran on node 0 of the job, its two workers under it
    assert sorted(p.name for p in (project / "results/logs/sft_launch/node0").glob("workerlog.*")) == [
        "workerlog.0", "workerlog.1"]
    sft_jobs = [j for j, rec in sacct_jobs(slurm_cluster, SUBMITTED.findall(proc.stdout + proc.stderr)).items()
                if rec["Comment"] == "rule_sft"]
    assert len(sft_jobs) == 1
    steps = slurm_cluster.run("sacct", "-P", "-n", "-j", sft_jobs[0], "-o", "JobID,JobName,NTasks,State").stdout
    # our srun is a step of the sft job (beside the batch step and the plugin's own step)
    ours = [s.split("|") for s in steps.splitlines() if s.split("|")[1] == "bash"]
    assert ours and all(s[2] == "1" and s[3] == "COMPLETED" for s in ours), steps
