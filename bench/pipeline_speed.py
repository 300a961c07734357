"""Orchestration overhead and per-stage cost of the default pipeline, each run in a fresh copy.

    .venv/bin/python bench/pipeline_speed.py               # 5 full default runs
    .venv/bin/python bench/pipeline_speed.py --quick       # 1 run, sft 10 steps, 4 prompts (tests)

`snakemake --cores 2 results/predictions.json` from nothing (no results/, no data/). Per run:
- wall: the whole command;
- jobs: the sum of the stage jobs' own wall time (Snakemake's benchmark TSVs, column `s`);
  wall - jobs is Snakemake's own orchestration (DAG, scheduling, file checks, job start);
- reported: what each stage says it took (the CLI's "<stage> finished in Xs" log line: from just
  after the CLI starts, so it includes the Paddle import and model load but not interpreter start);
- compute: the pure work the stages report themselves (sft train_seconds_this_run, predict seconds).
--baseline DIR: another tree (e.g. `git archive HEAD` extracted), its runs alternating with this
tree's round by round: before/after from the same machine state.
Per stage: job seconds and peak RSS (`max_rss`, MiB) from the TSVs, medians over runs.
Target: orchestration under 10 % of the run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
from pathlib import Path

import _common as C

# warmup and checkpoint cadence inside the 10 steps (llamapipe.config.rules refuses them past it)
QUICK_OVERLAY = ("sft:\n  max_steps: 10\n  warmup_steps: 2\n  save_steps: 10\n"
                 "predict:\n  limit: 4\n  max_new_tokens: 8\n")
FINISHED = re.compile(r"INFO llamapipe: (\S+) finished in ([\d.]+)s: (.*)$")


def read_run(project: Path) -> dict:
    stages = {}
    for tsv in sorted((project / "results/benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        stages[tsv.stem] = {"job_seconds": float(row["s"]), "max_rss_mib": float(row["max_rss"])}
    compute = {}
    for log in sorted((project / "results/logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = FINISHED.search(line)
            if m and log.stem in stages:
                stages[log.stem]["reported_seconds"] = float(m.group(2))
                summary = json.loads(m.group(3))
                if log.stem == "sft":
                    compute["sft"] = summary["train_seconds_this_run"]
                elif log.stem == "predict":
                    compute["predict"] = summary["seconds"]
    return {"stages": stages, "compute": compute}


def summarise(walls: list, per_run: list) -> dict:
    jobs = [sum(s["job_seconds"] for s in run["stages"].values()) for run in per_run]
    reported = [sum(s.get("reported_seconds", 0.0) for s in run["stages"].values()) for run in per_run]
    compute = [sum(run["compute"].values()) for run in per_run]
    names = sorted(per_run[-1]["stages"])
    return {
        "pipeline_wall_seconds": C.summary(walls),
        "stage_jobs_seconds": C.summary(jobs),
        "stage_reported_seconds": C.summary(reported),
        "stage_compute_seconds": C.summary(compute),
        # shares of the wall time, run by run
        "orchestration_share": C.summary([1 - j / w for j, w in zip(jobs, walls)]),
        "outside_reported_share": C.summary([1 - r / w for r, w in zip(reported, walls)]),
        "outside_compute_share": C.summary([1 - c / w for c, w in zip(compute, walls)]),
        "per_stage": {
            n: {
                "job_seconds": C.summary([run["stages"][n]["job_seconds"] for run in per_run]),
                "reported_seconds": statistics.median(run["stages"][n].get("reported_seconds", 0.0)
                                                      for run in per_run),
                "max_rss_mib": C.summary([run["stages"][n]["max_rss_mib"] for run in per_run], 1),
            }
            for n in names
        },
        "compute_seconds_last_run": per_run[-1]["compute"],
    }


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--baseline", help="another project tree (e.g. `git archive HEAD` extracted): its runs "
                    "alternate with this tree's, round by round, and are summarised apart (key `baseline`) "
                    "with paired differences")
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    cmd = [C.PYTHON, "-m", "snakemake", "results/predictions.json", "--cores", str(args.cores)]
    if args.quick:
        cmd += ["--configfile", "quick.yaml"]
    trees = {"this": (C.ROOT, None)}
    if args.baseline:  # its own src/ first on PYTHONPATH, so its stages run its code
        base = Path(args.baseline).resolve()
        trees["baseline"] = (base, {**os.environ, "PYTHONPATH": str(base / "src")})
    walls: dict = {k: [] for k in trees}
    per_run: dict = {k: [] for k in trees}
    with C.workdir(args.keep, "bench-pipeline-") as tmp:
        for r in range(runs):
            for name in list(trees)[r % len(trees):] + list(trees)[: r % len(trees)]:
                root, env = trees[name]
                project = C.fresh_copy(Path(tmp), root)
                (project / "quick.yaml").write_text(QUICK_OVERLAY)
                walls[name].append(C.run_measured(cmd, cwd=project, env=env,
                                                  log=Path(tmp) / f"snakemake-{name}-{r}.log")["seconds"])
                per_run[name].append(read_run(project))
    result = {"machine": C.machine(), "quick": args.quick, "command": " ".join(cmd[2:]),
              **summarise(walls["this"], per_run["this"])}
    if args.baseline:
        result["baseline"] = {"tree": str(trees["baseline"][0]), **summarise(walls["baseline"], per_run["baseline"])}
        result["paired_this_minus_baseline"] = {
            "wall_seconds": C.summary([a - b for a, b in zip(walls["this"], walls["baseline"])]),
            "wall_ratio": C.paired_ratio(walls["this"], walls["baseline"]),
        }
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    main()
