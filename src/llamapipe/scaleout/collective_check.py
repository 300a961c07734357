"""The collective smoke test's supervisor (rule ``smoke_collective``, npu target).

    python -m llamapipe.scaleout.collective_check --timeout 300 --cards 0,1,...,7 --reports DIR \\
        --launch-logs DIR --out results/smoke_collective.json -- python -u -m paddle.distributed.launch ...

Runs the launcher command after ``--`` (built by ``upstream_args.launch_argv``, as sft's is) under
a timeout, with the environment it was started with, unchanged: sft's. Each rank
(``llamapipe/stages/smoke_collective.py``) reports the step it is in; when the timeout passes the
launcher is stopped (it stops its ranks) and the message names the timeout and every rank that did
not report, with the step it was stuck in. On success the per-rank results, the devices, the
elapsed time and the collective environment the ranks saw go to ``--out``, written atomically.

Not a ``llamapipe`` CLI subcommand: the CLI sets thread and log variables before a stage runs,
and the ranks must see exactly what sft's ranks see. Python 3.9: it runs in the stage image.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError

TIMEOUT_KEY = "npu.smoke_timeout_s"
STOP_GRACE_S = 45.0  # the launcher's own stop on SIGTERM: SIGTERM to each rank, 30 s, then SIGKILL
LOG_TAIL_LINES = 15
RANK_FIELDS = ("rank", "global_rank", "device", "card", "visible_devices", "world_size", "all_reduce", "matmul",
               "seconds", "elapsed_s", "host", "paddle_version")


def _read_reports(reports: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for path in sorted(reports.glob("rank*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out[int(data["rank"])] = data
    return out


def _stop(proc: subprocess.Popen, ranks: dict[int, dict]) -> None:
    """SIGTERM to the launcher: it terminates its ranks (each in a session of its own) and waits
    for them. Still there after the grace: SIGKILL to it and to every rank pid we know."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
        return
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for report in ranks.values():
        try:
            os.kill(int(report["pid"]), signal.SIGKILL)
        except (OSError, KeyError, ValueError):
            pass


def _where(rank: int, report: dict | None) -> str:
    if report is None:
        return f"rank {rank}: no sign of life (its script never started or wrote nothing)"
    return f"rank {rank}: stuck in {report['phase']} (entered {report.get('elapsed_s', 0):.1f} s after it started)"


def _environment(ranks: dict[int, dict]) -> dict:
    """The collective environment the ranks saw: what all share, and each rank's own values."""
    envs = {r: rep.get("env", {}) for r, rep in sorted(ranks.items())}
    keys = sorted({k for env in envs.values() for k in env})
    common = {k: next(iter(envs.values()))[k] for k in keys
              if envs and all(k in env for env in envs.values())
              and len({env[k] for env in envs.values()}) == 1}
    per_rank = {str(r): {k: v for k, v in env.items() if k not in common} for r, env in envs.items()}
    return {"common": common, "per_rank": per_rank}


def _print_environment(env: dict) -> None:
    print("smoke_collective: the collective environment the ranks ran with (same on every rank):")
    for key, value in env["common"].items():
        print(f"  {key}={value}")
    for rank, own in env["per_rank"].items():
        if own:
            print(f"  rank {rank}: " + " ".join(f"{k}={v}" for k, v in own.items()))


def _rank_line(rank: int, report: dict) -> str:
    ar, mm = report.get("all_reduce") or {}, report.get("matmul") or {}
    return (f"  rank {rank}: {report.get('device')} (card {report.get('card')}), world {report.get('world_size')}, "
            f"visible devices {report.get('visible_devices')}, all-reduce {ar.get('got')} (expected "
            f"{ar.get('expected')}, {'ok' if ar.get('ok') else 'WRONG'}), matmul "
            f"{'ok' if mm.get('ok') else 'WRONG'}, {report.get('elapsed_s')} s")


def _log_tails(launch_logs: Path, ranks: list[int]) -> None:
    for rank in ranks:
        log = launch_logs / f"workerlog.{rank}"
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.is_file() else []
        print(f"--- {log} (last {len(lines)} lines)" if lines else f"--- {log}: missing or empty")
        for line in lines:
            print(f"  {line}")


def _checks(ranks: dict[int, dict], cards: list[str]) -> list[str]:
    """What is wrong in the reports of the ranks that finished (and ranks nobody asked for)."""
    n = len(cards)
    problems = []
    done = {r for r, rep in ranks.items() if rep.get("phase") == "done"}
    extra = sorted(set(ranks) - set(range(n)))
    if extra:
        problems.append(f"ranks {extra} reported, beyond the {n} cards asked for ({','.join(cards)})")
    for r in sorted(done & set(range(n))):
        rep = ranks[r]
        nodes = int(rep.get("env", {}).get("PADDLE_NNODES", "1"))
        if rep.get("world_size") != n * nodes:
            problems.append(f"rank {r}: world size {rep.get('world_size')}, not the {n} cards asked for"
                            + (f" x {nodes} nodes" if nodes > 1 else ""))
        if rep.get("visible_devices") not in (None, n):
            problems.append(f"rank {r}: the runtime shows {rep['visible_devices']} cards, not the {n} asked for "
                            f"(ASCEND_RT_VISIBLE_DEVICES={rep.get('env', {}).get('ASCEND_RT_VISIBLE_DEVICES')})")
        ar = rep.get("all_reduce") or {}
        if not ar.get("ok"):
            problems.append(f"rank {r}: all-reduce sum {ar.get('got')} ({ar.get('wrong_elements')} of "
                            f"{ar.get('elements')} elements wrong), expected {ar.get('expected')}")
        mm = rep.get("matmul") or {}
        if not mm.get("ok"):
            problems.append(f"rank {r}: matmul differs from numpy by up to {mm.get('max_abs_error')}")
    devices = [ranks[r].get("device") for r in sorted(done)]
    shared = sorted({d for d in devices if d and d != "cpu" and devices.count(d) > 1})
    if shared:
        problems.append(f"ranks share device(s) {shared}: each rank must have a card of its own")
    return problems


def run(launch: list[str], cards: list[str], timeout: float, reports: str, launch_logs: str, out: str) -> dict:
    reports_dir, logs_dir = Path(reports), Path(launch_logs)
    for stale in (logs_dir, reports_dir):  # a previous attempt's logs and reports must not count
        shutil.rmtree(stale, ignore_errors=True)
    reports_dir.mkdir(parents=True)
    print(f"smoke_collective: all-reduce, matmul and barrier on {len(cards)} rank(s) (cards {','.join(cards)}), "
          f"timeout {timeout:g} s ({TIMEOUT_KEY})", flush=True)
    print(f"smoke_collective: {shlex.join(launch)}", flush=True)
    started = time.monotonic()
    # in our process group, as sft's launcher is in its script's: a stopped job stops it too
    proc = subprocess.Popen(launch)
    try:
        code: int | None = proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"smoke_collective: no verdict after {timeout:g} s: stopping the launcher", flush=True)
        _stop(proc, _read_reports(reports_dir))
        code = proc.returncode
    elapsed = time.monotonic() - started
    ranks = _read_reports(reports_dir)
    env = _environment(ranks)
    _print_environment(env)
    print("smoke_collective: per rank:")
    for r, rep in sorted(ranks.items()):
        print(_rank_line(r, rep) if rep.get("phase") == "done" else "  " + _where(r, rep))
    n = len(cards)
    silent = [r for r in range(n) if ranks.get(r, {}).get("phase") != "done"]
    not_reported = "; ".join(_where(r, ranks.get(r)) for r in silent)
    problems = []
    if timed_out:
        problems.append(f"timed out after {timeout:g} s ({TIMEOUT_KEY}): {n - len(silent)} of the {n} ranks "
                        + (f"reported; did not report: {not_reported}" if silent else
                           "reported, but the launcher did not exit (a rank hangs on its way out)"))
    elif code != 0:
        problems.append(f"the launcher exited with {code} after {elapsed:.1f} s; "
                        + (f"did not report: {not_reported}" if silent else "every rank reported"))
    elif silent:
        problems.append(f"{n - len(silent)} of the {n} ranks asked for reported; did not report: {not_reported}")
    problems += _checks(ranks, cards)
    if problems:
        _log_tails(logs_dir, silent or list(range(n)))
        raise PipelineError("\n".join(problems))
    result = {
        "ok": True,
        "world_size": n,
        "devices": [int(c) for c in cards],
        "timeout_s": timeout,
        "elapsed_s": round(elapsed, 3),
        "launcher": launch,
        "ranks": [{k: rep.get(k) for k in RANK_FIELDS} for _, rep in sorted(ranks.items())],
        "all_reduce_ok": True,
        "matmul_ok": True,
        "environment": env,
    }
    write_json(out, result)
    print(f"smoke_collective: ok: {n} rank(s) summed {ranks[0]['all_reduce']['got']:g} and matched numpy's "
          f"matmul in {elapsed:.1f} s -> {out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: python -m llamapipe.scaleout.collective_check [options] -- <launcher command>")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m llamapipe.scaleout.collective_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, required=True, help=f"seconds ({TIMEOUT_KEY})")
    parser.add_argument("--cards", required=True, help="the host's card ids, comma-separated: one rank each")
    parser.add_argument("--reports", required=True, help="directory of the ranks' report files")
    parser.add_argument("--launch-logs", required=True, help="the launcher's --log_dir")
    parser.add_argument("--out", required=True, help="results/smoke_collective.json")
    args = parser.parse_args(argv[:cut])
    launch = argv[cut + 1:]
    if not launch:
        sys.exit("collective_check: no launcher command after --")
    try:
        run(launch, args.cards.split(","), args.timeout, args.reports, args.launch_logs, args.out)
    except PipelineError as exc:
        print(f"smoke_collective failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
