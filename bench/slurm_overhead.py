"""Per-job overhead of the SLURM executor against the local one, for the same small cpu DAG.

    .venv/bin/python bench/slurm_overhead.py               # 3 rounds (~6 min each on 2 cores)
    .venv/bin/python bench/slurm_overhead.py --quick       # 1 round, data rules only (~1 min)
    .venv/bin/python bench/slurm_overhead.py --slurm-conf /path/slurm.conf   # a running cluster

Needs root and Debian's SLURM packages (`make system-deps`): it starts the tests' one-node
cluster (tests/slurm_cluster.py: munged, mariadbd, slurmdbd, slurmctld, slurmd) and stops it at
the end (`--slurm-conf`: use a running cluster instead, partition `--partition`). Each round runs, \
in two fresh copies of the project, alternating which goes first,

    local: snakemake --cores 2 --configfile config.yaml small.yaml -- results/metrics.json
    slurm: snakemake --profile profiles/slurm --default-resources slurm_partition=cpu runtime=30
           mem_mb=2000 --slurm-init-seconds-before-status-checks 1 --configfile ... (the same)

(small.yaml: sft 20 steps, 8 predictions of 16 tokens; the SLURM tests' settings). Per run: wall
seconds, jobs, the sum of the jobs' own time (Snakemake benchmark TSVs, column `s`, measured
inside the job). Reported: the per-job overhead (slurm wall - local wall) / jobs, the wall ratio,
and each executor's time outside the jobs per job ((wall - sum of jobs) / jobs).
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

SMALL = "sft: {max_steps: 20, save_steps: 10, warmup_steps: 5}\nexport: {max_new_tokens: 16}\n" \
        "predict: {limit: 8, max_new_tokens: 16}\n"
TARGET = ["--configfile", "config.yaml", "small.yaml", "--", "results/metrics.json"]
QUICK_TARGET = ["--configfile", "config.yaml", "small.yaml", "--", "results/data/train.json"]


@dataclass
class Running:
    """A cluster started elsewhere (e.g. by `python tests/slurm_cluster.py`)."""
    conf: str
    cpu_partition: str
    versions: dict

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}


def project(base: Path) -> Path:
    dest = C.fresh_copy(base)
    shutil.copytree(C.ROOT / "profiles", dest / "profiles")
    (dest / "small.yaml").write_text(SMALL)
    return dest


def job_seconds(proj: Path) -> list[float]:
    out = []
    for tsv in sorted((proj / "results/benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            out.append(float(next(csv.DictReader(f, delimiter="\t"))["s"]))
    return out


def one_run(kind: str, base: Path, cluster, threads: int, target: list[str]) -> dict:
    proj = project(base)
    cmd = [C.PYTHON, "-m", "snakemake"]
    if kind == "local":
        cmd += ["--cores", str(threads), *target]
        env = C.thread_env(threads)
    else:
        cmd += ["--profile", "profiles/slurm", "--default-resources", f"slurm_partition={cluster.cpu_partition}",
                "runtime=30", "mem_mb=2000", "--slurm-init-seconds-before-status-checks", "1", *target]
        env = {**C.thread_env(threads), **{k: v for k, v in cluster.env().items() if k.startswith(("SLURM_", "LLAMA"))}}
    measured = C.run_measured(cmd, cwd=proj, env=env, log=base / f"{kind}-{proj.name}.log")
    jobs = job_seconds(proj)
    return {"wall": measured["seconds"], "jobs": len(jobs), "jobs_seconds": sum(jobs)}


def main() -> None:
    ap = C.parser(__doc__, runs=3)
    ap.add_argument("--slurm-conf", help="use the cluster of this slurm.conf instead of starting one")
    ap.add_argument("--partition", default="cpu", help="with --slurm-conf: the partition for the jobs")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    target = QUICK_TARGET if args.quick else TARGET
    import slurm_cluster as S

    base = Path(tempfile.mkdtemp(prefix="lps", dir="/tmp"))
    if args.slurm_conf:
        cluster = Running(args.slurm_conf, args.partition, {"slurm": S._version("slurmctld")})
    else:
        cluster, reason = S.cluster_or_reason(base / "c")
        if cluster is None:
            raise SystemExit(reason)
    results: dict[str, list[dict]] = {"local": [], "slurm": []}
    try:
        with C.workdir(args.keep, "bench-slurm-") as work:
            for i in range(runs):
                order = ("local", "slurm") if i % 2 == 0 else ("slurm", "local")
                for kind in order:
                    start = time.monotonic()
                    results[kind].append(one_run(kind, Path(work), cluster, args.threads, target))
                    print(f"round {i + 1}/{runs} {kind}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    finally:
        if not args.slurm_conf:
            S.stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)
    loc, slu = results["local"], results["slurm"]
    n = loc[0]["jobs"]
    assert all(r["jobs"] == n for r in loc + slu), results
    per_job = [(s["wall"] - c["wall"]) / n for s, c in zip(slu, loc)]
    outside = {k: [(r["wall"] - r["jobs_seconds"]) / n for r in v] for k, v in results.items()}
    C.emit({
        "benchmark": "slurm_overhead",
        "machine": {**C.machine(), "slurm": cluster.versions.get("slurm"),
                    "plugin": _version("snakemake-executor-plugin-slurm"),
                    "jobstep_plugin": _version("snakemake-executor-plugin-slurm-jobstep")},
        "jobs_per_run": n,
        "local_wall_seconds": C.summary([r["wall"] for r in loc], 1),
        "slurm_wall_seconds": C.summary([r["wall"] for r in slu], 1),
        "wall_ratio_slurm_over_local": C.paired_ratio([r["wall"] for r in slu], [r["wall"] for r in loc]),
        "overhead_per_job_seconds": C.summary(per_job, 1),
        "local_outside_jobs_per_job_seconds": C.summary(outside["local"], 2),
        "slurm_outside_jobs_per_job_seconds": C.summary(outside["slurm"], 2),
        "jobs_seconds": {k: C.summary([r["jobs_seconds"] for r in v], 1) for k, v in results.items()},
        "runs": results,
    }, args.json_out)


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
