"""Wall time of the default pipeline and of a dry-run, each in a fresh copy of the project.

    .venv/bin/python bench/pipeline_speed.py --runs 3      # the numbers in bench/RESULTS.md
    .venv/bin/python bench/pipeline_speed.py --quick       # tiny settings, 1 run (the tests run this)

Reports median and min-max wall time, and the share of the run spent inside the stage jobs
(sum of Snakemake's per-rule benchmark seconds) versus Snakemake's own orchestration.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("Snakefile", "config.yaml", "workflow", "assets", "envs", "Dockerfile.npu", ".dockerignore")
QUICK_OVERLAY = "sft:\n  max_steps: 10\npredict:\n  limit: 4\n  max_new_tokens: 8\n"


def fresh_copy(base: Path) -> Path:
    dest = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    for name in PROJECT_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest


def timed(cmd, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def stage_seconds(project: Path) -> dict:
    out = {}
    for tsv in sorted((project / "results/benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            out[tsv.stem] = float(next(csv.DictReader(f, delimiter="\t"))["s"])
    return out


def summary(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dry-runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    runs, dry_runs = (1, 1) if args.quick else (args.runs, args.dry_runs)
    snakemake = [sys.executable, "-m", "snakemake"]
    extra = ["--configfile", "quick.yaml"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        walls, inside, per_stage = [], [], []
        for _ in range(runs):
            project = fresh_copy(Path(tmp))
            (project / "quick.yaml").write_text(QUICK_OVERLAY)
            walls.append(timed([*snakemake, "results/predictions.json", "--cores", "2", *extra], project))
            stages = stage_seconds(project)
            per_stage.append(stages)
            inside.append(sum(stages.values()))
        project = fresh_copy(Path(tmp))
        dry = [timed([*snakemake, "-n", "results/predictions.json"], project) for _ in range(dry_runs)]
    result = {
        "pipeline_wall_seconds": summary(walls),
        "stage_jobs_seconds": summary(inside),
        "orchestration_share": round(1 - statistics.median(inside) / statistics.median(walls), 3),
        "per_stage_seconds_last_run": per_stage[-1],
        "dry_run_seconds": summary(dry),
        "quick": args.quick,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
