"""Run every benchmark and print one markdown table (what `make bench` runs).

    .venv/bin/python bench/run_all.py                    # >= 5 runs each, about 25 min on 2 cores
    .venv/bin/python bench/run_all.py --quick            # each benchmark's --quick, about 2 min
    .venv/bin/python bench/run_all.py --only sft_throughput,inference_speed --out-dir /tmp/b

Each script runs as its own process (its own thread settings) and writes <name>.json into
--out-dir (default: a new temporary directory, named on stderr); the table is printed and, with
--markdown-out, written to a file. Scripts and what they measure: see each one's docstring and
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

BENCHMARKS = ("pipeline_speed", "stage_costs", "sft_throughput", "sft_processes", "inference_speed",
              "prepare_data_scale", "dry_run")


def fmt(s: dict, unit: str = "", digits: int = 2, scale: float = 1.0) -> str:
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s.get("runs", 1) == 1:
        return f"{med:,.{digits}f}{unit}"
    return f"{med:,.{digits}f}{unit} ({lo:,.{digits}f} - {hi:,.{digits}f})"


def table(res: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    p = res.get("pipeline_speed")
    if p:
        rows += [
            ("1 | default `snakemake` run, wall", fmt(p["pipeline_wall_seconds"], " s", 1), ""),
            ("1 | sum of stage jobs (Snakemake benchmark `s`)", fmt(p["stage_jobs_seconds"], " s", 1), ""),
            ("1 | Snakemake orchestration share (1 - jobs / wall)", fmt(p["orchestration_share"], " %", 1, 100),
             "< 10 %"),
            ("1 | share outside the stages' own reported time", fmt(p["outside_reported_share"], " %", 1, 100), ""),
            ("1 | share outside pure compute (sft train + predict decode)",
             fmt(p["outside_compute_share"], " %", 1, 100), "<= 25 %"),
        ]
    c = res.get("stage_costs")
    if c:
        for k, label in (("python", "`python -c pass`"), ("cli", "`llamapipe --help`"),
                         *((("paddle_only", "`import paddle`"),) if "paddle_only" in c["seconds"] else ()),
                         ("paddle_import", "`import paddle, paddlenlp.transformers`"),
                         *((("transformers_part", "PaddleNLP's transformers part only (init_model, export)"),)
                           if "transformers_part" in c["seconds"] else ()),
                         ("trainer_import", "... + `paddlenlp.trainer`"), ("model_load", "... + tiny model load")):
            rows.append((f"1 | fixed cost: {label}",
                         fmt(c["seconds"][k], " s", 2) + f", {c['max_rss_mib'][k]['median']:.0f} MiB", ""))
    s = res.get("sft_throughput")
    if s:
        for k, label in (("stage", "sft stage (Trainer)"), ("paddle", "bare Paddle loop"),
                         ("torch", "PyTorch + transformers")):
            if k in s["tokens_per_second"]:
                rows.append((f"2 | SFT tokens/s, {label}", fmt(s["tokens_per_second"][k], "", 0), ""))
        r = s["ratios"]
        rows.append(("2 | sft stage / bare Paddle loop", fmt(r["stage_over_paddle_bare"], "", 3), ">= 0.9"))
        if "torch_over_paddle_bare" in r:
            rows.append(("2 | PyTorch / bare Paddle loop", fmt(r["torch_over_paddle_bare"], "", 2), "(report)"))
            rows.append(("2 | sft stage / PyTorch", fmt(r["stage_over_torch"], "", 2), "(report)"))
        else:
            rows.append(("2 | PyTorch peer", s["torch"], ""))
    q = res.get("sft_processes")
    if q:
        rows += [(f"2 | SFT tokens/s, {n} (global batch 8)", fmt(q["tokens_per_second"][k], "", 0), "")
                 for k, n in (("1_process", "1 process"), ("2_process", "2 processes"))]
        rows.append(("2 | 2 processes / 1 process, tokens/s", fmt(q["ratio_2_over_1"]["tokens_per_second"], "x", 2),
                     "(report)"))
    i = res.get("inference_speed")
    if i:
        for b, entry in i["results"].items():
            bs = b.split("_")[1]
            for m in ("static", "static_shipped", "dygraph"):
                if m in entry:
                    rows.append((f"3 | batch {bs}, {m} tokens/s", fmt(entry[m]["tokens_per_second"], "", 0)
                                 + ("" if entry[m]["identical_tokens"] in (True, None) else " (tokens differ!)"), ""))
            for m in ("static", "static_shipped"):
                key = f"{m}_speedup_over_dygraph"
                if key in entry:
                    rows.append((f"3 | batch {bs}, {m} / dygraph speed", fmt(entry[key], "x", 2),
                                 ">= 1.0x" if bs == "8" and m == "static" else ""))
    d = res.get("prepare_data_scale")
    if d:
        rows.append((f"4 | prepare_data, {d['train_records']:,} + {d['dev_records']:,} records ({d['input_mib']} MiB)",
                     fmt(d["seconds"], " s", 2), "< 30 s"))
        rows.append(("4 | prepare_data records/s", fmt(d["records_per_second"], "", 0), ""))
    y = res.get("dry_run")
    if y:
        for k in ("default", "npu"):
            rows.append((f"5 | `snakemake -n`, {k} DAG", fmt(y["seconds"][k], " s", 2), ""))
    if p:
        for n, st in sorted(p["per_stage"].items(), key=lambda kv: -kv[1]["max_rss_mib"]["median"]):
            rows.append((f"6 | {n}: peak RSS, job wall", fmt(st["max_rss_mib"], " MiB", 0) + ", "
                         + fmt(st["job_seconds"], " s", 1), ""))
    out = ["| # / what | median (min - max) | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {t} |" for a, b, t in rows]
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--out-dir")
    ap.add_argument("--markdown-out")
    args = ap.parse_args(argv)
    names = [n for n in BENCHMARKS if not args.only or n in args.only.split(",")]
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="bench-all-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"results in {out}", file=sys.stderr)
    results, took = {}, {}
    for name in names:
        cmd = [C.PYTHON, str(Path(__file__).parent / f"{name}.py"), "--json-out", str(out / f"{name}.json")]
        cmd += ["--quick"] if args.quick else ["--runs", str(args.runs)]
        print(f"== {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        took[name] = round(time.perf_counter() - start, 1)
        results[name] = json.loads((out / f"{name}.json").read_text())
    md = table(results)
    header = f"Machine: {json.dumps(C.machine())}; benchmark wall seconds: {json.dumps(took)}\n\n"
    print(header + md)
    if args.markdown_out:
        Path(args.markdown_out).write_text(header + md + "\n")
    return {"results": results, "markdown": md, "seconds": took}


if __name__ == "__main__":
    main()
