"""Per-job overhead of the SLURM executor against the local one, for the same small cpu DAG.

    .venv/bin/python bench/slurm_overhead.py               # 3 rounds (~6 min each on 2 cores)
    .venv/bin/python bench/slurm_overhead.py --quick       # 1 round, data rules only (~1 min)
    .venv/bin/python bench/slurm_overhead.py --slurm-conf /path/slurm.conf   # a running cluster
    .venv/bin/python bench/slurm_overhead.py --config 'sft={max_steps: 40}'  # more --config, both runs
    .venv/bin/python bench/slurm_overhead.py --ungrouped   # the profile without its groups: a job a rule
    .venv/bin/python bench/slurm_overhead.py --default-target   # + plots, report tables, provenance

Needs root and Debian's SLURM packages (`make system-deps`): it starts the tests' one-node
cluster (tests/slurm_cluster.py: munged, mariadbd, slurmdbd, slurmctld, slurmd) and stops it at
the end (`--slurm-conf`: use a running cluster instead, partition `--partition`). Each round runs, \
in two fresh copies of the project, alternating which goes first,

    local: snakemake --cores 2 --configfile config.yaml small.yaml -- results/metrics.json
    slurm: snakemake --profile profiles/slurm --default-resources slurm_partition=cpu runtime=30
           mem_mb=2000 --slurm-init-seconds-before-status-checks 1 --configfile ... (the same)

(small.yaml: sft 20 steps, 8 predictions of 16 tokens; the SLURM tests' settings; `--config ...`
adds Snakemake --config values to both runs). Per run: wall seconds, jobs, the sum of the jobs'
own time (Snakemake benchmark TSVs, column `s`, measured inside the job), and for SLURM the
sbatch submissions (profiles/slurm batches the light rules into group jobs, so fewer than the
jobs). Reported: the per-job overhead (slurm wall - local wall) / jobs, the same per SLURM
submission, the wall ratio, and each executor's time outside the jobs per job ((wall - sum of
jobs) / jobs).
"""

from __future__ import annotations

import csv
import os
import re
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
DEFAULT_TARGET = ["--configfile", "config.yaml", "small.yaml"]  # the Snakefile's: metrics, plots, tables ...
STEPS = re.compile(r"(\d+) of \1 steps \(100%\) done")  # Snakemake's last progress line: every job, `all` too
SUBMITTED = re.compile(r"has been submitted with SLURM jobid \d+")  # the plugin's line per sbatch


@dataclass
class Running:
    """A cluster started elsewhere (e.g. by `python tests/slurm_cluster.py`)."""
    conf: str
    cpu_partition: str
    versions: dict

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}


def project(base: Path, ungrouped: bool = False) -> Path:
    dest = C.fresh_copy(base)
    shutil.copytree(C.ROOT / "profiles", dest / "profiles")
    (dest / "small.yaml").write_text(SMALL)
    if ungrouped:  # the baseline: every rule its own SLURM job, as before profiles/slurm had groups
        import yaml

        path = dest / "profiles" / "slurm" / "config.yaml"
        profile = yaml.safe_load(path.read_text())
        for key in ("groups", "group-components"):
            profile.pop(key, None)
        path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def job_seconds(proj: Path) -> list[float]:
    out = []
    for tsv in sorted((proj / "results/benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            out.append(float(next(csv.DictReader(f, delimiter="\t"))["s"]))
    return out


def with_config(target: list[str], config: list[str]) -> list[str]:
    """``target`` with ``--config <config...>`` before its ``--`` (none given: ``target`` as is)."""
    if not config:
        return target
    if "--" not in target:
        return [*target, "--config", *config]
    cut = target.index("--")
    return [*target[:cut], "--config", *config, *target[cut:]]


def one_run(kind: str, base: Path, cluster, threads: int, target: list[str], ungrouped: bool = False) -> dict:
    proj = project(base, ungrouped)
    log = base / f"{kind}-{proj.name}.log"
    cmd = [C.PYTHON, "-m", "snakemake"]
    if kind == "local":
        cmd += ["--cores", str(threads), *target]
        env = C.thread_env(threads)
    else:
        cmd += ["--profile", "profiles/slurm", "--default-resources", f"slurm_partition={cluster.cpu_partition}",
                "runtime=30", "mem_mb=2000", "--slurm-init-seconds-before-status-checks", "1", *target]
        env = {**C.thread_env(threads), **{k: v for k, v in cluster.env().items() if k.startswith(("SLURM_", "LLAMA"))}}
    measured = C.run_measured(cmd, cwd=proj, env=env, log=log)
    jobs = job_seconds(proj)
    text = log.read_text(errors="replace")
    steps = STEPS.findall(text)
    run = {"wall": measured["seconds"], "jobs": len(jobs), "jobs_seconds": sum(jobs),
           "steps": int(steps[-1]) if steps else None}
    if kind == "slurm":
        run["slurm_jobs"] = len(SUBMITTED.findall(text))
    return run


def main() -> None:
    ap = C.parser(__doc__, runs=3)
    ap.add_argument("--slurm-conf", help="use the cluster of this slurm.conf instead of starting one")
    ap.add_argument("--partition", default="cpu", help="with --slurm-conf: the partition for the jobs")
    ap.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                    help="Snakemake --config values for both runs (on top of config.yaml and small.yaml)")
    ap.add_argument("--default-target", action="store_true",
                    help="the workflow's default target (plots, report tables, provenance too; 12 rules, of which "
                         "9 write a benchmark) instead of results/metrics.json")
    ap.add_argument("--ungrouped", action="store_true",
                    help="profiles/slurm without its groups and group-components (one SLURM job per rule)")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    target = with_config(QUICK_TARGET if args.quick else DEFAULT_TARGET if args.default_target else TARGET,
                         args.config)
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
                    results[kind].append(one_run(kind, Path(work), cluster, args.threads, target, args.ungrouped))
                    print(f"round {i + 1}/{runs} {kind}: {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    finally:
        if not args.slurm_conf:
            S.stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)
    loc, slu = results["local"], results["slurm"]
    n = loc[0]["jobs"]
    assert all(r["jobs"] == n for r in loc + slu), results
    submitted = slu[0]["slurm_jobs"]
    assert all(r["slurm_jobs"] == submitted for r in slu), results
    per_job = [(s["wall"] - c["wall"]) / n for s, c in zip(slu, loc)]
    per_submission = [(s["wall"] - c["wall"]) / submitted for s, c in zip(slu, loc)]
    outside = {k: [(r["wall"] - r["jobs_seconds"]) / n for r in v] for k, v in results.items()}
    C.emit({
        "benchmark": "slurm_overhead",
        "machine": {**C.machine(), "slurm": cluster.versions.get("slurm"),
                    "plugin": _version("snakemake-executor-plugin-slurm"),
                    "jobstep_plugin": _version("snakemake-executor-plugin-slurm-jobstep")},
        "config": args.config,
        "profile_groups": not args.ungrouped,
        "target": target,
        "jobs_per_run": n,
        "snakemake_steps_per_run": loc[0]["steps"],
        "slurm_jobs_per_run": submitted,
        "local_wall_seconds": C.summary([r["wall"] for r in loc], 1),
        "slurm_wall_seconds": C.summary([r["wall"] for r in slu], 1),
        "wall_ratio_slurm_over_local": C.paired_ratio([r["wall"] for r in slu], [r["wall"] for r in loc]),
        "overhead_per_job_seconds": C.summary(per_job, 1),
        "overhead_per_slurm_job_seconds": C.summary(per_submission, 1),
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
