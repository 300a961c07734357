"""The rehearsal's tensor-parallel layout against one process: is it the same training?

    .venv/bin/python bench/tp_rehearsal.py --checkout /tmp/PaddleNLP          # 60 steps + both rehearsals
    .venv/bin/python bench/tp_rehearsal.py --checkout /tmp/PaddleNLP --quick  # 5 steps, no whole rehearsals

(``--checkout``: a PaddleNLP checkout at the pinned commit, else $LLAMAPIPE_PADDLENLP_SRC.)

Part 1, losses per step. Upstream's ``run_finetune.py`` with the default rehearsal's own sft
command (taken from ``snakemake -n -p``: the guide's layout shrunk to 2 processes, tensor
parallel 2, sequence parallel, sharding stage1, through the CPU shims) against one process
(``--tensor_parallel_degree 1 --sequence_parallel false``, one launcher process), same base
weights, data, seed and flags otherwise. PaddleNLP's Trainer draws batches with
``paddle.io.BatchSampler`` in one process and ``DistributedBatchSampler`` in several: two orders
of the same data, hence a 0.35% step-1 loss difference. So one process runs twice: as upstream
runs it, and drawing the batches the multi-process sampler draws (``bench/_same_batches.py``, a
comparison aid of this bench only).

Part 2 (not with --quick): both rehearsals from nothing, each in a fresh copy of the project:
the default (tensor parallel 2) and
``'npu={parallel: {tensor_parallel_degree: 1, sequence_parallel: false}}'`` (the
one-process rehearsal): wall time, sft time, final loss and metrics.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import _common as C

REHEARSAL = ["--config", "target=npu", "rehearsal=cpu"]


def _snakemake(project: Path, args: list[str], env: dict, log: Path) -> float:
    cmd = [str(Path(C.PYTHON).parent / "snakemake"), "--cores", "2", *args]
    return C.run_measured(cmd, cwd=project, env=env, log=log)["seconds"]


def _sft_launch(project: Path, env: dict) -> tuple[list[str], list[str], str]:
    """(exports, the launcher's argv, the directory it runs in) of the rehearsal's sft rule."""
    out = subprocess.run([str(Path(C.PYTHON).parent / "snakemake"), "-n", "-p", "-F", "results/sft", *REHEARSAL],
                         cwd=project, env=env, capture_output=True, text=True, check=True).stdout
    shell = next(line for line in out.splitlines() if "run_finetune.py" in line and "bash -c" in line)
    script = shlex.split(shell[shell.index("bash -c"):])[2]
    steps = [shlex.split(step) for step in script.split("; ")]
    exports = [s[1] for s in steps if s[:1] == ["export"] and "$" not in s[1]]
    cwd = next(s[1] for s in steps if s[:1] == ["cd"] and s[1].endswith("/llm"))
    launch = next(s for s in steps if "paddle.distributed.launch" in s)
    return exports, launch, cwd


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _losses(log_dir: Path) -> list[float]:
    from llamapipe.stages.collect import parse_trainer_log  # collect-sft's own reading of the log

    lines = (log_dir / "workerlog.0").read_text(errors="replace").splitlines()
    return [entry["loss"] for entry in parse_trainer_log(lines)]


def per_step(project: Path, env: dict, work: Path, steps: int) -> dict:
    exports, launch, cwd = _sft_launch(project, env)
    run_env = dict(env)
    for item in exports:
        key, _, value = item.partition("=")
        run_env[key] = value
    checkout = Path(cwd).parent
    run_env["PYTHONPATH"] = os.pathsep.join([str(checkout), cwd, str(C.ROOT / "src"), str(C.ROOT / "bench")])
    base = _set(launch, "--max_steps", str(steps))
    base = [C.PYTHON if w == "python" else w for w in base]
    shim = next(w for w in base if w.endswith("cpu_shims_script.py"))
    one = _set(_set(_set(base, "--nproc_per_node", "1"), "--tensor_parallel_degree", "1"), "--sequence_parallel",
               "false")
    runs = {
        "tp2": base,
        "one_process_upstream_batches": one,
        "one_process_same_batches": [str(C.ROOT / "bench/_same_batches.py") if w == shim else w for w in one],
    }
    losses, seconds = {}, {}
    for name, argv in runs.items():
        out = work / name
        argv = _set(_set(argv, "--output_dir", str(out / "ckpt")), "--log_dir", str(out / "launch"))
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, env=run_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds[name] = round(time.perf_counter() - start, 1)
        losses[name] = _losses(out / "launch")
        assert len(losses[name]) == steps, (name, len(losses[name]))

    def rel(a: list[float], b: list[float]) -> list[float]:
        return [abs(x - y) / abs(y) for x, y in zip(a, b)]

    same = rel(losses["tp2"], losses["one_process_same_batches"])
    upstream = rel(losses["tp2"], losses["one_process_upstream_batches"])
    return {
        "steps": steps,
        "layout": {k: launch[launch.index(k) + 1] for k in ("--tensor_parallel_degree", "--sequence_parallel",
                                                              "--sharding", "--nproc_per_node")},
        "losses": losses,
        "seconds": seconds,
        "tp2_vs_same_batches": {"max_rel": max(same), "steps_bitwise_equal": sum(r == 0.0 for r in same),
                                "step1_rel": same[0]},
        "tp2_vs_upstream_batches": {"max_rel": max(upstream), "step1_rel": upstream[0]},
    }


def whole_rehearsal(base: Path, env: dict, extra: list[str], log: Path) -> dict:
    project = C.fresh_copy(base)
    wall = _snakemake(project, ["results/metrics.json", *REHEARSAL, *extra], env, log)
    results = project / "results"
    stage = {p.stem: float(p.read_text().splitlines()[1].split("\t")[0])
             for p in (results / "benchmarks").glob("*.tsv")}
    log_lines = [json.loads(x) for x in (results / "sft/train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((results / "metrics.json").read_text())  # evaluate: after predict
    return {"wall_s": round(wall, 1), "sft_s": stage.get("sft"), "steps": len(log_lines),
            "first_loss": log_lines[0]["loss"], "last_loss": log_lines[-1]["loss"],
            "last10_mean_loss": round(sum(e["loss"] for e in log_lines[-10:]) / 10, 4),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def main() -> None:
    ap = C.parser(__doc__, runs=1)
    ap.add_argument("--checkout", default=os.environ.get("LLAMAPIPE_PADDLENLP_SRC"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if not args.checkout:
        raise SystemExit("a PaddleNLP checkout is needed: --checkout DIR or LLAMAPIPE_PADDLENLP_SRC=DIR")
    env = C.thread_env(args.threads, LLAMAPIPE_PADDLENLP_SRC=os.path.abspath(args.checkout))
    env["PATH"] = f"{Path(C.PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    result = {"machine": C.machine()}
    with C.workdir(args.keep, "bench-tp-") as tmp:
        work = Path(tmp)
        project = C.fresh_copy(work)
        _snakemake(project, ["results/model/base", "results/data/train.json", *REHEARSAL], env, work / "base.log")
        result["per_step"] = per_step(project, env, work, 5 if args.quick else args.steps)
        if not args.quick:
            result["rehearsal_tp2"] = whole_rehearsal(work, env, [], work / "tp2.log")
            result["rehearsal_one_process"] = whole_rehearsal(
                work, env, ["npu={parallel: {tensor_parallel_degree: 1, sequence_parallel: false}}"], work / "tp1.log")
    C.emit(result, args.json_out)


if __name__ == "__main__":
    main()
