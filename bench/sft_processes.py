"""SFT with one process against two data-parallel processes (paddle.distributed.launch, gloo).

    .venv/bin/python bench/sft_processes.py            # 5 rounds of 200 steps each
    .venv/bin/python bench/sft_processes.py --quick    # 1 round of 20 steps (the tests run this)

The same global batch both ways, as `sft.processes: 2` with half the per-process batch runs it:
one process at batch 8 on the rule's threads, two processes at batch 4 with the threads shared out
(one each on 2 threads). The two-process command is the one the sft rule runs, built by
llamapipe.runners.commands (the launcher builder the npu target uses). One round runs both back to back
(alternating which goes first); ratios are per round.

- tokens_per_second: the stage's own train_summary.json (global tokens over the training loop).
- wall: the whole stage process, imports and the launcher included (a user's wait).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import _common as C

BATCH = 8


def _sft_argv(params: dict, ws: dict, out: Path, ckpt: Path, threads: int) -> list[str]:
    return ["llamapipe", "sft", "--params", json.dumps(params), "--seed", "42", "--threads", str(threads),
            "--train", str(ws["train"]), "--base", str(ws["base"]), "--out", str(out), "--ckpt-dir", str(ckpt)]


def command(processes: int, params: dict, ws: dict, work: Path, tag: str, threads: int) -> list[str]:
    """The sft rule's command for this many processes (llamapipe.runners.commands.stage_command)."""
    from llamapipe.runners import commands

    sft = {**params, "processes": processes, "per_device_train_batch_size": BATCH // processes}
    cfg = {"target": "cpu", "runtime": "local", "sft": sft}
    paths = {"sft_launch_logs": str(work / f"launch-{tag}")}
    argv = _sft_argv(sft, ws, work / f"sft-{tag}", work / f"ckpt-{tag}", threads)
    return shlex.split(commands.stage_command("sft", cfg, paths, str(work), argv, threads=threads))


def main(argv=None) -> dict:
    args = C.parser(__doc__).parse_args(argv)
    runs, steps = (1, 20) if args.quick else (args.runs, 200)
    params = {**C.stage_params(C.load_config())["sft"], "max_steps": steps, "save_steps": steps,
              "warmup_steps": min(20, steps // 2)}
    rows: dict[int, dict[str, list[float]]] = {1: {"tps": [], "wall": []}, 2: {"tps": [], "wall": []}}
    with C.workdir(args.keep, "bench-sft-processes-") as tmp:
        work = Path(tmp)
        ws = C.build_workspace(work, threads=args.threads)
        env = C.thread_env(args.threads, PATH=f"{Path(C.PYTHON).parent}:{os.environ.get('PATH', '')}")
        for r in range(runs):
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
                tag = f"{processes}p-{r}"
                cmd = command(processes, params, ws, work, tag, args.threads)
                measured = C.run_measured(cmd, cwd=work, env=env, log=ws["logs"] / f"sft-{tag}.log")
                summary = json.loads((work / f"sft-{tag}" / "train_summary.json").read_text())
                assert summary["processes"] == processes and summary["global_step"] == steps
                rows[processes]["tps"].append(summary["tokens_per_second"])
                rows[processes]["wall"].append(measured["seconds"])
    result = {
        "what": f"sft, {steps} steps, global batch {BATCH}: 1 process x {BATCH} vs 2 processes x {BATCH // 2}",
        "tokens_per_second": {f"{p}_process": C.summary(rows[p]["tps"], 1) for p in (1, 2)},
        "wall_seconds": {f"{p}_process": C.summary(rows[p]["wall"], 2) for p in (1, 2)},
        "ratio_2_over_1": {"tokens_per_second": C.paired_ratio(rows[2]["tps"], rows[1]["tps"]),
                           "wall_seconds": C.paired_ratio(rows[2]["wall"], rows[1]["wall"])},
        "quick": args.quick,
        "machine": C.machine(),
        "command": "python bench/sft_processes.py" + (" --quick" if args.quick else ""),
    }
    return C.emit(result, args.json_out)


if __name__ == "__main__":
    main(sys.argv[1:])
