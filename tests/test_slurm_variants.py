"""Two variants (full, LoRA) through their comparison on the real SLURM test cluster
(tests/slurm_cluster.py) with profiles/slurm: each variant's sft is a SLURM job of its own, the
light rules share group jobs, every job completes, and the comparison holds both variants. The
same DAG with the local executor in another copy gives the wall-time ratio printed (a figure for
bench/RESULTS.md, never asserted)."""

from __future__ import annotations

import csv
import time

import pytest
import yaml

from conftest import copy_project, snakemake
from test_slurm import SMALL, SUBMITTED, cpu_settings, sacct_jobs, slurm_logs

VARIANTS = {"full": {}, "lora": {"sft": {"lora": True, "learning_rate": 1.0e-2}}}
TARGET = "results/variants/comparison.html"


def _project(path):
    project = copy_project(path)
    (project / "small.yaml").write_text(SMALL + yaml.safe_dump({"variants": VARIANTS}))
    return project


@pytest.mark.slurm
@pytest.mark.e2e
def test_two_variants_on_slurm_each_sft_a_job_of_its_own(slurm_cluster, tmp_path):
    args = ("--configfile", "config.yaml", "small.yaml", "--", TARGET)
    local = _project(tmp_path / "local")
    start = time.monotonic()
    snakemake(local, "--cores", "2", *args, timeout=900)
    local_wall = time.monotonic() - start

    project = _project(tmp_path / "slurm")
    start = time.monotonic()
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster), *args,
                     check=False, timeout=1800, env=slurm_cluster.env())
    slurm_wall = time.monotonic() - start
    if proc.returncode != 0:
        raise AssertionError(f"snakemake --profile profiles/slurm failed:\n{proc.stderr[-5000:]}"
                             f"{slurm_logs(project)}\n{slurm_cluster.log_tails()}")
    job_ids = SUBMITTED.findall(proc.stdout + proc.stderr)
    jobs = sacct_jobs(slurm_cluster, job_ids)
    print(f"[two variants] local {local_wall:.0f} s, SLURM {slurm_wall:.0f} s "
          f"({slurm_wall / local_wall:.1f}x), {len(job_ids)} SLURM jobs", flush=True)
    assert {r["State"] for r in jobs.values()} == {"COMPLETED"}, jobs
    comments = sorted(r["Comment"] for r in jobs.values())
    sft_jobs = [c for c in comments if c.startswith("rule_sft_variant")]
    assert len(sft_jobs) == 2 and any("full" in c for c in sft_jobs) and any("lora" in c for c in sft_jobs), comments
    # the light rules never went one sbatch each
    assert not [c for c in comments if c.startswith(("rule_prepare_data", "rule_evaluate", "rule_plots",
                                                     "rule_provenance", "rule_comparison"))], comments
    rows = list(csv.DictReader((project / "results/variants/comparison.tsv").open(), delimiter="\t"))
    assert [r["run"] for r in rows] == ["full", "lora"]
    for name in ("full", "lora"):  # the cluster's run is the local one, byte for byte
        mine = (project / f"results/variants/{name}/predictions.json").read_bytes()
        assert mine == (local / f"results/variants/{name}/predictions.json").read_bytes(), name
