"""The rehearsal's CPU stand-ins for Paddle calls (``llamapipe.npu.cpu_shims``).

- Each stand-in computes what the call it replaces computes: two real processes (gloo) run
  Paddle's own tensor-parallel calls through the shims and compare with one process's plain
  ops on the whole tensors, values and gradients.
- Without the shims those calls fail on CPU as the rehearsal's list says (so none is idle).
- Every shim is on the rehearsal's list, with the Paddle call it replaces.
- The pinned protobuf keeps Paddle's DistributedStrategy readable (protobuf 7 broke it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamapipe.config.rehearsal import CPU_SHIMS
from llamapipe.npu import cpu_shims

ROOT = Path(__file__).resolve().parent.parent
TP_SHIMS = ["c_identity", "c_concat", "c_softmax_with_cross_entropy", "gloo_calc_stream", "gloo_reduce_scatter",
            "broadcast_input_data"]


def _launch(tmp_path: Path, shims: list[str]) -> subprocess.CompletedProcess:
    script = ROOT / "tests/shim_checks/tensor_parallel_ops.py"
    return subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                           str(tmp_path / "logs"), str(script), str(tmp_path), ",".join(shims)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _worker_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("workerlog.*")))


@pytest.mark.e2e
def test_tensor_parallel_stand_ins_compute_what_the_kernels_compute(tmp_path):
    proc = _launch(tmp_path, TP_SHIMS)
    assert proc.returncode == 0, _worker_logs(tmp_path)[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("c_concat", "c_concat_grad", "softmax_ce", "softmax_ce_grad"):
            assert got[key] < 1e-5, (rank, key, got[key])
        assert got["c_identity"] == [1.0, 2.0] and got["c_identity_grad"] == [3.0, 3.0]
        assert got["reduce_scatter"] == ([0.0, 3.0] if rank == 0 else [6.0, 9.0])  # (0,1,2,3) x (1 + 2)
        assert got["broadcast"] == [[10, 20]]  # rank 0's batch on both ranks


@pytest.mark.e2e
def test_without_the_stand_ins_those_calls_fail_on_cpu(tmp_path):
    proc = _launch(tmp_path, [])
    assert proc.returncode != 0
    assert "Do not support c_concat for cpu kernel now" in _worker_logs(tmp_path)


def test_every_shim_is_on_the_rehearsals_list_naming_the_call_it_replaces():
    assert list(CPU_SHIMS) == list(cpu_shims.SHIMS)
    for name, reason in CPU_SHIMS.items():
        assert "." in reason.split(" ")[0] and len(reason) > 80, name  # it opens with the dotted call
    schema = (ROOT / "workflow/schemas/config.schema.yaml").read_text()
    assert "propertyNames: {enum: [" + ", ".join(CPU_SHIMS) + "]}" in schema


def test_an_unknown_shim_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="unknown cpu shim.*c_concatt.*known: c_identity"):
        cpu_shims.main(["--shims=c_concatt", "script.py"])


def test_pinned_protobuf_keeps_paddles_distributed_strategy_readable():
    """protobuf 7 removed FieldDescriptor.label, which Paddle 3.0.0's get_msg_dict reads: every
    DistributedStrategy getter then raised, and run_finetune.py stopped with "tensor_parallel_configs
    is not a attribute of DistributedStrategy"."""
    code = ("import paddle.distributed.fleet as f; s = f.DistributedStrategy(); "
            "s.tensor_parallel_configs = {'tensor_init_seed': 1}; "
            "print(s.tensor_parallel_configs['tensor_init_seed'], sorted(s.hybrid_configs)[:1], s.sharding_configs)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "1"


def test_protobuf_is_pinned_alike_wherever_the_stack_is_installed():
    import google.protobuf

    def pin(path: str) -> str:
        lines = (ROOT / path).read_text().splitlines()
        return next(line.split("#")[0].strip() for line in lines if line.startswith("protobuf=="))

    assert pin("envs/constraints.txt") == pin("envs/npu-stage-requirements.txt") == \
        f"protobuf=={google.protobuf.__version__}"
    assert "tensor_parallel_configs" in (ROOT / "Dockerfile.npu").read_text()  # the image build checks it
