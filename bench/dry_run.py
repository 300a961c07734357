"""`snakemake -n` wall time for the default (cpu) DAG and the npu DAG, in a fresh project copy.

    .venv/bin/python bench/dry_run.py            # 5 rounds
    .venv/bin/python bench/dry_run.py --quick    # 1 round

Both DAGs are planned from nothing (no results/), alternating default and npu in each round.
The npu dry-run builds the whole container DAG (images, ops wheel, upstream commands) without a
card or an engine. Target: a few seconds, cheap enough for CI on every push.
"""

from __future__ import annotations

from pathlib import Path

import _common as C

VARIANTS = {
    "default": ["results/predictions.json"],
    "npu": ["results/predictions.json", "--config", "target=npu"],
}


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    result: dict = {"machine": C.machine(), "quick": args.quick}
    seconds: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with C.workdir(args.keep, "bench-dry-") as tmp:
        project = C.fresh_copy(Path(tmp))
        log = Path(tmp) / "dry_run.log"
        for _ in range(runs):
            for name, extra in VARIANTS.items():
                cmd = [C.PYTHON, "-m", "snakemake", "-n", *extra]
                seconds[name].append(C.run_measured(cmd, cwd=project, log=log)["seconds"])
    result["seconds"] = {k: C.summary(v) for k, v in seconds.items()}
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    main()
