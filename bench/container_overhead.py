"""Container overhead per stage: the same stage command run locally and through
`llamapipe container-run` (docker SDK: create, start, stream logs, wait, remove), side by side.

    DOCKER_HOST=unix:///path/sock .venv/bin/python bench/container_overhead.py [--runs 5] [--quick]

Needs a running engine that has the llamapipe-cpu:test image: start one with
`.venv/bin/python tests/docker_engine.py --cache ~/.cache/llamapipe-docker --build` (prints the
DOCKER_HOST to export). Two commands: `python -c pass` (pure overhead) and the evaluate stage on
a small predictions file (a real stage, no Paddle import).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llamapipe.config import load  # noqa: E402
from llamapipe.runners.commands import container_spec  # noqa: E402


def timed(cmd: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one run of each")
    args = ap.parse_args(argv)
    if not os.environ.get("DOCKER_HOST"):
        raise SystemExit("set DOCKER_HOST to an engine with llamapipe-cpu:test (see the docstring)")
    runs = 1 if args.quick else args.runs
    cfg = load(str(ROOT / "config.yaml"))
    cfg["runtime"] = "container"
    with tempfile.TemporaryDirectory(dir=str(Path.home())) as work:
        preds = [{"src": "类型#裙*颜色#蓝色", "tgt": "蓝色连衣裙清新自然", "prediction": "蓝色连衣裙"}] * 20
        Path(work, "p.json").write_text(json.dumps(preds, ensure_ascii=False), encoding="utf-8")
        spec = json.dumps(container_spec("evaluate", cfg, work))
        boxed = [sys.executable, "-m", "llamapipe", "container-run", "--spec", spec, "--"]
        commands = {
            "python -c pass": ["python", "-c", "pass"],
            "evaluate stage": ["python", "-m", "llamapipe", "evaluate", "--predictions", "p.json", "--out", "m.json"],
        }
        env_python = {"python -c pass": [sys.executable, "-c", "pass"],
                      "evaluate stage": [sys.executable, "-m", "llamapipe", "evaluate", "--predictions", "p.json",
                                         "--out", "m.json"]}
        result = {}
        for name, cmd in commands.items():
            local, container = [], []
            for _ in range(runs):  # interleaved: both see the same machine noise
                local.append(timed(env_python[name], work))
                container.append(timed(boxed + cmd, work))
            result[name] = {"local_s": summary(local), "container_s": summary(container),
                            "overhead_s": round(statistics.median(container) - statistics.median(local), 3)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
