"""Per-stage fixed cost: what every stage process pays before it computes anything.

    .venv/bin/python bench/stage_costs.py             # 5 rounds
    .venv/bin/python bench/stage_costs.py --quick     # 1 round

Wall seconds and peak RSS (wait4's ru_maxrss) of child processes, run round by round in the same
order, OMP_NUM_THREADS=2:
- python:        `python -c pass` (interpreter start)
- cli:           `python -m llamapipe --help` (our CLI, no Paddle)
- paddle_only:   `import paddle` (what predict and a full-fine-tune merge import since issue 12)
- paddle_import: `import paddle, paddlenlp.transformers` (the whole package, as sft imports it)
- transformers_part: `llamapipe.core.paddlenlp_import.import_parts(TRANSFORMERS)`, what init_model
  and export import since issue 12's second pass (no eager package ``__init__``)
- trainer_import: ... plus `paddlenlp.trainer` (what sft imports)
- model_load:    paddle_import plus `AutoModelForCausalLM.from_pretrained(<default tiny base model>)`
sft pays about trainer_import (+ model load) once per process, init_model and export
transformers_part, predict and merge (full fine-tune) paddle_only; preflight reads versions from
package metadata (no import). bench/pipeline_speed.py has each stage's own wall time and peak RSS
from a real run; run_all.py puts the two side by side.
"""

from __future__ import annotations

from pathlib import Path

import _common as C

PY = C.PYTHON


def commands(base: Path) -> dict[str, list[str]]:
    imp = "import paddle, paddlenlp.transformers"
    return {
        "python": [PY, "-c", "pass"],
        "cli": [PY, "-m", "llamapipe", "--help"],
        "paddle_only": [PY, "-c", "import paddle"],
        "paddle_import": [PY, "-c", imp],
        "transformers_part": [PY, "-c", "from llamapipe.core.paddlenlp_import import TRANSFORMERS, import_parts; "
                              "import_parts(TRANSFORMERS)"],
        "trainer_import": [PY, "-c", imp + ", paddlenlp.trainer"],
        "model_load": [PY, "-c", imp + f"; paddlenlp.transformers.AutoModelForCausalLM.from_pretrained({str(base)!r})"],
    }


def main(argv=None) -> dict:
    ap = C.parser(__doc__)
    args = ap.parse_args(argv)
    runs = 1 if args.quick else args.runs
    env = C.thread_env(args.threads)
    result: dict = {"machine": C.machine(), "quick": args.quick, "threads": args.threads}
    with C.workdir(args.keep, "bench-costs-") as tmp:
        ws = C.build_workspace(Path(tmp), threads=args.threads)
        cmds = commands(ws["base"])
        for cmd in cmds.values():  # warm the page cache once: every stage after the first finds it warm
            C.run_measured(cmd, env=env)
        seconds: dict[str, list[float]] = {k: [] for k in cmds}
        rss: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(runs):
            for name, cmd in cmds.items():
                m = C.run_measured(cmd, env=env, log=ws["logs"] / f"{name}.log")
                seconds[name].append(m["seconds"])
                rss[name].append(m["max_rss_mib"])
    result["seconds"] = {k: C.summary(v) for k, v in seconds.items()}
    result["max_rss_mib"] = {k: C.summary(v, 1) for k, v in rss.items()}
    med = {k: v["median"] for k, v in result["seconds"].items()}
    result["derived_seconds"] = {
        "paddle_import_over_python": round(med["paddle_import"] - med["python"], 3),
        "paddlenlp_over_paddle_only": round(med["paddle_import"] - med["paddle_only"], 3),
        "transformers_part_over_paddle_only": round(med["transformers_part"] - med["paddle_only"], 3),
        "trainer_import_over_paddle_import": round(med["trainer_import"] - med["paddle_import"], 3),
        "model_load_over_paddle_import": round(med["model_load"] - med["paddle_import"], 3),
    }
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    main()
