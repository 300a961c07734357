"""N node launchers on this host: the one-host stand-in for ``srun`` over N nodes.

    python -m llamapipe.scaleout.local_nodes --nodes 2 -- python -u -m paddle.distributed.launch \
        --nproc_per_node 1 --log_dir logs/node@NODE@ --nnodes 2 --master 127.0.0.1:36677 ...

Starts the command once per node with ``@NODE@`` replaced by the node's index, prefixes each
node's output with ``[nodeK]``, and behaves as ``srun --kill-on-bad-exit`` does: the first node
that fails stops the others, and the exit code is that node's. SIGTERM/SIGINT reach every node;
the launcher stops its workers (which it starts in sessions of their own) when it gets them. The
launchers stay in this job's process group, where a rerun after a killed snakemake looks for
leftover jobs (llamapipe.snakemake_hooks.stale_lock).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time

from llamapipe.scaleout.launch import NODE_ID

STOP_GRACE_S = 20  # after SIGTERM, before SIGKILL: the launcher stops its workers in that time


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(nodes: int, argv: list[str]) -> int:
    if NODE_ID not in " ".join(argv):
        print(f"local_nodes: the command names no {NODE_ID}: every node would log to the same files",
              file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    pumps = []
    for k in range(nodes):
        p = subprocess.Popen([a.replace(NODE_ID, str(k)) for a in argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[node{k}] "), daemon=True)
        t.start()
        pumps.append(t)

    def forward(signum, _frame):
        _stop(procs)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed: int | None = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((k for k, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        time.sleep(0.2)
    failed = next((k for k, p in enumerate(procs) if p.poll() not in (None, 0)), failed)
    if failed is not None:
        print(f"local_nodes: node {failed} exited with {procs[failed].returncode}; stopping the others",
              file=sys.stderr, flush=True)
        _stop(procs)
    for t in pumps:
        t.join(timeout=5)
    return procs[failed].returncode if failed is not None else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llamapipe.scaleout.local_nodes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then one node's launcher command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.nodes < 1 or not command:
        parser.error("needs --nodes >= 1 and a command after --")
    sys.exit(run(args.nodes, command))


if __name__ == "__main__":
    main()
