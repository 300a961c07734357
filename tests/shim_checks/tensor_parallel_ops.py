"""Run under ``paddle.distributed.launch --nproc_per_node 2`` by tests/test_cpu_shims.py.

Each rank applies the CPU shims, runs Paddle's own tensor-parallel calls (fleet's mp_ops and
process group, unchanged) on its shard of fixed inputs, and writes what it got next to what one
process computes with plain ops on the whole inputs (values and gradients), as JSON.
"""

import json
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from llamapipe.npu import cpu_shims

cpu_shims.apply([name for name in sys.argv[2].split(",") if name])
dist.init_parallel_env()
group = dist.new_group([0, 1])
rank, out = dist.get_rank(), {}
rng = np.random.default_rng(0)
logits_np = rng.standard_normal((3, 5, 8)).astype("float32")  # vocabulary 8, 4 per rank
labels_np = rng.integers(0, 8, (3, 5)).astype("int64")
labels_np[0, 0] = -100  # an ignored position
shard = slice(rank * 4, rank * 4 + 4)

from paddle.distributed.fleet.layers.mpu import mp_ops  # noqa: E402

# c_concat: the gathered logits and, for this rank's shard, the gradient of their weighted sum
x = paddle.to_tensor(logits_np[..., shard], stop_gradient=False)
weights = paddle.to_tensor(np.arange(8, dtype="float32"))
whole = mp_ops._c_concat(x, group=group)
(whole * weights).sum().backward()
out["c_concat"] = np.abs(whole.numpy() - logits_np).max().item()
out["c_concat_grad"] = np.abs(x.grad.numpy() - np.broadcast_to(np.arange(8)[shard], x.shape)).max().item()

# c_softmax_with_cross_entropy: loss and shard gradient against F.cross_entropy on the whole row
x = paddle.to_tensor(logits_np[..., shard], stop_gradient=False)
loss = mp_ops._c_softmax_with_cross_entropy(x, paddle.to_tensor(labels_np), group=group)
loss.sum().backward()
ref_x = paddle.to_tensor(logits_np, stop_gradient=False)
ref = F.cross_entropy(ref_x, paddle.to_tensor(labels_np).unsqueeze(-1), ignore_index=-100, reduction="none")
ref.sum().backward()
out["softmax_ce"] = np.abs(loss.numpy() - ref.numpy()).max().item()
out["softmax_ce_grad"] = np.abs(x.grad.numpy() - ref_x.grad.numpy()[..., shard]).max().item()

# c_identity forward, with its all-reduced gradient (c_identity_eager.backward, calc stream)
x = paddle.to_tensor([1.0, 2.0], stop_gradient=False)
y = mp_ops._c_identity(x, group=group)
(y * (rank + 1)).sum().backward()
out["c_identity"] = y.numpy().tolist()
out["c_identity_grad"] = x.grad.numpy().tolist()  # 1 + 2 from the two ranks

# reduce_scatter_tensor: the sum, split along the first axis
src = paddle.to_tensor(np.arange(4, dtype="float32").reshape(4, 1) * (rank + 1))
dst = paddle.empty([2, 1], dtype="float32")
dist.stream.reduce_scatter(dst, src, group=group, sync_op=True)
out["reduce_scatter"] = dst.numpy().ravel().tolist()

# broadcast_input_data: every rank gets the model-parallel source rank's batch
from paddle.distributed import fleet  # noqa: E402
from paddle.distributed.fleet.meta_parallel import tensor_parallel  # noqa: E402

strategy = fleet.DistributedStrategy()
strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1}
fleet.init(is_collective=True, strategy=strategy)
batch = {"input_ids": paddle.to_tensor([[10 + rank, 20 + rank]])}
tensor_parallel.broadcast_input_data(fleet.get_hybrid_communicate_group(), **batch)  # in place, as Paddle's
out["broadcast"] = batch["input_ids"].numpy().tolist()

with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
