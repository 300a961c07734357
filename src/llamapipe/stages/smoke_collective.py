"""One rank of the collective smoke test (rule ``smoke_collective``, npu target).

``paddle.distributed.launch`` starts this file on every card sft will use, with sft's launcher
flags and environment: ``init_parallel_env``, an all-reduce whose sum every rank checks, a small
matmul checked against numpy, a barrier. Before each step the rank replaces
``<reports>/rank<N>.json`` with the step it is entering, so when a rank hangs
``llamapipe.scaleout.collective_check`` (which runs the launcher under a timeout) can say where each
rank stopped.

Self-contained (stdlib, numpy, paddle), Python 3.9: it runs as a script in the stage image.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

# The launcher runs this file as a script: its directory (llamapipe/stages) would come first on
# sys.path, and our stage module names would shadow top-level modules of the same names.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

# What a rank prints and reports of its environment: the collective, runtime and Paddle settings
# (npu.env's MC2_/MULTI_STREAM_/GLOG_ keys included).
ENV_PREFIXES = ("HCCL_", "ASCEND_", "FLAGS_", "PADDLE_", "GLOO_", "GLOG_", "MC2_", "MULTI_STREAM_")
ALL_REDUCE_SIZE = 1 << 20  # float32 elements: a 4 MB buffer, not only a scalar
MATMUL_N = 64  # small integer entries: every product sum is exact in fp32 (and fp16/hf32)


def collective_env() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


class Report:
    """This rank's report file, rewritten (atomically) at each step."""

    def __init__(self, directory: str, rank: int) -> None:
        self.rank = rank
        self.path = os.path.join(directory, f"rank{rank}.json")
        self.data: dict = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "phase": "started",
                           "env": collective_env(), "seconds": {}}
        self._t0 = time.monotonic()
        self._step_t0 = self._t0
        self._write()

    def enter(self, phase: str) -> None:
        self.data["phase"] = phase
        self.data["elapsed_s"] = round(time.monotonic() - self._t0, 3)
        self._step_t0 = time.monotonic()
        self._write()
        print(f"[rank {self.rank}] {phase} ...", flush=True)

    def finish(self, phase: str, **values) -> None:
        self.data["seconds"][phase] = round(time.monotonic() - self._step_t0, 3)
        self.data.update(values)

    def done(self) -> None:
        self.data["phase"] = "done"
        self.data["elapsed_s"] = round(time.monotonic() - self._t0, 3)
        self._write()

    def _write(self) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def _visible_devices(paddle) -> int | None:
    """Cards the runtime lets this process see (ASCEND_RT_VISIBLE_DEVICES applied); None on CPU."""
    kinds = paddle.device.get_all_custom_device_type() or []
    if not kinds:
        return None
    return sum(1 for d in paddle.device.get_available_custom_device() if d.split(":")[0] == kinds[0])


def _card(device: str) -> str | None:
    """The host card behind ``npu:<i>``: the i-th id of ASCEND_RT_VISIBLE_DEVICES."""
    if ":" not in device:
        return None
    index = int(device.split(":")[1])
    visible = [c for c in os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "").split(",") if c]
    return visible[index] if index < len(visible) else None


def run(reports: str) -> dict:
    global_rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    rank = int(os.environ.get("PADDLE_LOCAL_RANK", global_rank))  # this node's ranks: one per card
    report = Report(reports, rank)
    for key, value in report.data["env"].items():
        print(f"[rank {rank}] {key}={value}", flush=True)

    report.enter("import paddle")
    import numpy as np
    import paddle
    import paddle.distributed as dist

    report.finish("import paddle")
    report.enter("init_parallel_env")
    dist.init_parallel_env()
    device = paddle.get_device()
    report.finish("init_parallel_env", world_size=dist.get_world_size(), global_rank=dist.get_rank(),
                  device=device, card=_card(device), visible_devices=_visible_devices(paddle),
                  paddle_version=paddle.__version__)
    world = report.data["world_size"]

    report.enter("all_reduce")
    x = paddle.full([ALL_REDUCE_SIZE], float(global_rank + 1), dtype="float32")
    dist.all_reduce(x)
    got = x.numpy()
    expected = world * (world + 1) / 2.0  # sum of global rank + 1 over all ranks
    wrong = int((got != expected).sum())
    report.finish("all_reduce", all_reduce={"expected": expected, "got": float(got[0]), "wrong_elements": wrong,
                                            "elements": ALL_REDUCE_SIZE, "ok": wrong == 0})

    report.enter("matmul")
    i, j = np.indices((MATMUL_N, MATMUL_N))
    a, b = ((i + 2 * j + rank) % 7).astype("float32"), ((3 * i + j) % 5).astype("float32")
    c = paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy()
    error = float(np.abs(c.astype("float64") - a.astype("float64") @ b.astype("float64")).max())
    report.finish("matmul", matmul={"shape": [MATMUL_N, MATMUL_N], "max_abs_error": error, "ok": error == 0.0})

    report.enter("barrier")
    dist.barrier()
    report.finish("barrier")
    report.done()
    ar, mm = report.data["all_reduce"], report.data["matmul"]
    print(f"[rank {rank}] {device} (card {report.data['card']}): all-reduce {ar['got']:g} (expected {expected:g}, "
          f"{'ok' if ar['ok'] else 'WRONG'}), matmul {'ok' if mm['ok'] else 'WRONG'} "
          f"(max error {error:g}), {report.data['elapsed_s']:.1f} s", flush=True)
    return report.data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", required=True, help="directory of the per-rank report files")
    run(parser.parse_args(argv).reports)


if __name__ == "__main__":
    main()
