"""Run one of PaddleNLP's ``llm/`` scripts on CPU with the rehearsal's stand-ins for what Paddle lacks there.

    python -m llamapipe.npu.cpu_shims --shims=c_identity,... predict/export_model.py --model_name_or_path ...
    python -m paddle.distributed.launch ... <src>/llamapipe/entrypoints/cpu_shims_script.py --shims=... run_finetune.py

The NPU run calls the same scripts with plain ``python`` (or the launcher); the rehearsal
(``rehearsal: cpu``) calls them through this module, which replaces the named Paddle calls and
then runs the script unchanged as ``__main__`` (``runpy``), so its own argument parsing and code
paths are untouched. Every stand-in replaces one Paddle call, never PaddleNLP's model or trainer
code; the rehearsal's list of differences (``llamapipe.config.rehearsal``, ``npu.cpu_shims``)
names each one with its reason. The tensor-parallel ones keep the collective's semantics (the
same values, forward and backward, as the kernel they stand in for: ``tests/test_cpu_shims.py``
checks them against one process), built from the collectives gloo does have.

Python 3.9 compatible: it runs inside the stage image.
"""

import functools
import runpy
import sys


def _group_of(ring_id):
    from paddle.distributed import collective

    return collective._get_group_map()[ring_id]


def _gather_last_axis(tensor, group):
    """all_gather over ``group`` (gloo has it), concatenated along the last axis."""
    import paddle
    import paddle.distributed as dist

    parts = []
    dist.all_gather(parts, tensor, group=group, sync_op=True)
    return paddle.concat(parts, axis=-1)


@functools.cache
def _concat_layer():
    """One PyLayer class, shared by c_concat and c_softmax_with_cross_entropy (built on first use:
    this module imports no Paddle at load)."""
    from paddle.autograd import PyLayer

    class ConcatOverRanks(PyLayer):
        """c_concat: each rank's shard, gathered along the last axis; the gradient of a shard is
        its slice of the output's gradient (c_concat's grad op, c_split)."""

        @staticmethod
        def forward(ctx, tensor, rank, nranks, ring_id):
            ctx.rank, ctx.nranks = rank, nranks
            return _gather_last_axis(tensor, _group_of(ring_id))

        @staticmethod
        def backward(ctx, dy):
            import paddle

            return paddle.split(dy, ctx.nranks, axis=-1)[ctx.rank]

    return ConcatOverRanks


def c_identity():
    """``_C_ops.c_identity`` (and ``_legacy_C_ops.c_identity``): no CPU kernel ("Do not support
    c_identity for cpu kernel now"). The kernel is a copy of its input (a new tensor: the PyLayer
    around it refuses its own input back for a leaf); the all-reduce of its gradient is that
    PyLayer's backward (``mp_ops.c_identity_eager.backward``), which still runs."""
    import paddle

    def identity(tensor, *_attrs):
        return paddle.assign(tensor)

    paddle._C_ops.c_identity = identity
    paddle._legacy_C_ops.c_identity = identity


def c_concat():
    """``_C_ops.c_concat``: no CPU kernel. An all_gather over the ring's group, concatenated
    along the last axis, with c_concat's gradient (the rank's slice)."""
    import paddle

    layer = _concat_layer()

    def concat(tensor, rank, nranks, ring_id, use_calc_stream=True, use_model_parallel=True):
        return layer.apply(tensor, rank, nranks, ring_id)

    paddle._C_ops.c_concat = concat


def c_softmax_with_cross_entropy():
    """``_C_ops.c_softmax_with_cross_entropy`` (the vocabulary-parallel loss behind
    ``--tensor_parallel_output true``): no CPU kernel. The logits' shards are gathered (as
    c_concat, differentiable) and the loss is the plain cross entropy of the whole row: the same
    value and, for each rank's shard, the same gradient as the fused kernel."""
    import paddle
    import paddle.nn.functional as F

    layer = _concat_layer()

    def softmax_with_cross_entropy(logits, label, ignore_index, ring_id, rank, nranks):
        whole = layer.apply(logits, rank, nranks, ring_id)
        loss = F.cross_entropy(whole, label, ignore_index=ignore_index, reduction="none", axis=-1)
        softmax = paddle.split(F.softmax(whole, axis=-1), nranks, axis=-1)[rank]
        return softmax, loss

    paddle._C_ops.c_softmax_with_cross_entropy = softmax_with_cross_entropy


def gloo_calc_stream():
    """``ProcessGroupGloo.<collective>_on_calc_stream``: gloo does not support the calc-stream
    variants ("ProcessGroupGLOO does not support all_reduce with sync_op and use_calc_stream
    flag"). A CPU process has one stream: the collective with ``sync_op=True``, waited for."""
    from paddle.base import core

    def synchronous(name):
        def run(self, *args):
            task = getattr(self, name)(*args, True)
            task.wait()
            return task

        return run

    calls = ("all_reduce", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter_tensor", "send", "recv")
    for name in calls:
        setattr(core.ProcessGroupGloo, name + "_on_calc_stream", synchronous(name))


def gloo_reduce_scatter():
    """``ProcessGroupGloo.reduce_scatter_tensor``: gloo has no reduce_scatter ("ProcessGroupGLOO
    does not support reduce_scatter with sync_op flag"); sequence parallel's row-parallel linears
    and sharding's gradient fusion call it. An all_reduce of a copy, then the rank's slice along
    the first axis into ``out``: the same result, twice the traffic."""
    import paddle
    from paddle.base import core

    def reduce_scatter_tensor(self, out, tensor, op, sync_op=True):
        whole = tensor.clone()
        task = self.all_reduce(whole, op, True)
        task.wait()
        paddle.assign(paddle.split(whole, self.size(), axis=0)[self.rank()], output=out)
        return task

    core.ProcessGroupGloo.reduce_scatter_tensor = reduce_scatter_tensor


def broadcast_input_data():
    """``fleet.utils.hybrid_parallel_util.broadcast_input_data``: asserts "Only support xpu, gpu
    and custom_device now, but this is cpu" (and parses a device index "cpu" has not). The same
    broadcast from the model-parallel group's first rank, on CPUPlace, so every tensor-parallel
    rank trains on the batch rank 0 read, as on the cards."""
    import paddle
    from paddle.distributed.fleet.meta_parallel import tensor_parallel
    from paddle.distributed.fleet.utils import hybrid_parallel_util as util

    original = util.broadcast_input_data

    @functools.wraps(original)
    def broadcast(hcg, *inputs, **kwargs):
        if paddle.get_device() != "cpu":
            return original(hcg, *inputs, **kwargs)
        place = paddle.CPUPlace()
        if inputs:
            inputs = util._broadcast_nested_data(hcg, "cpu", place, inputs)
        if kwargs:
            kwargs = util._broadcast_nested_data(hcg, "cpu", place, kwargs)
        return inputs, kwargs

    util.broadcast_input_data = broadcast
    tensor_parallel.broadcast_input_data = broadcast  # imported by name there


def tensor_fusion_cpu():
    """``fleet.utils.tensor_fusion_helper.get_current_device_type``: asserts "tensor fusion helper
    now only support gpu, npu, xpu, but got device unknown" (sharding's
    ``enable_stage1_tensor_fusion`` with more than one sharding rank). CPU gets the same 256-byte
    buffer alignment as the three devices it knows."""
    import paddle
    from paddle.distributed.fleet.utils import tensor_fusion_helper as helper

    original = helper.get_current_device_type

    @functools.wraps(original)
    def device_type():
        return "cpu" if paddle.get_device() == "cpu" else original()

    helper.alignment["cpu"] = helper.alignment["npu"]
    helper.get_current_device_type = device_type


def param_storage_cpu():
    """``fleet.meta_parallel.sharding.group_sharded_storage.ParamStorage.add_rank_params``: with
    ``convert_gpu=True`` (tensor fusion's call) it copies each parameter to the host
    (``param.cpu()``), clears the parameter, then moves the buffer to the device
    (``cvt_to_device``: "Only supported compiled paddle with gpu/rocm and xpu"). On CPU
    ``param.cpu()`` is the parameter itself, so the clear empties it: the model trains from
    zeros (the loss stays at ln(vocab)). On CPU the buffer is where it belongs already:
    ``convert_gpu=False``, the copy without the clear."""
    import paddle
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_storage import ParamStorage

    original = ParamStorage.add_rank_params

    @functools.wraps(original)
    def add_rank_params(self, trainable_params, param2align, convert_gpu=True):
        on_cpu = paddle.get_device() == "cpu"
        return original(self, trainable_params, param2align, convert_gpu and not on_cpu)

    ParamStorage.add_rank_params = add_rank_params


def parallel_env_device_id():
    """``paddle.distributed.ParallelEnv.device_id``: a CPU build sets no ``_device_id`` (only its
    cuda, xpu and custom-device branches do), so reading it raises AttributeError; the pipeline
    layer (``PipelineLayer.__init__``) reads it. A CPU process is device 0."""
    from paddle.distributed.parallel import ParallelEnv

    ParallelEnv._device_id = 0  # a class default: set instances keep their own


def export_without_top_p():
    """``GenerationMixin.to_static`` traces ``paddle.tensor.top_p_sampling``, which has no float32
    CPU kernel ("Check data type error for op: top_p_sampling"): export with ``use_top_p=False``
    (greedy and top-k decoding, which is all the predictor's ``greedy_search`` uses)."""
    from paddlenlp.generation.utils import GenerationMixin

    original = GenerationMixin.to_static

    @functools.wraps(original)
    def to_static(self, path, config):
        return original(self, path, dict(config, use_top_p=False))

    GenerationMixin.to_static = to_static


def predictor_without_inplace_pass():
    """``paddle.inference.create_predictor``: Paddle Inference's PIR ``inplace_pass`` with oneDNN
    breaks the exported decode loop on CPU (tokens after the first differ from dygraph): the
    predictor runs without that pass."""
    import paddle.inference

    original = paddle.inference.create_predictor

    @functools.wraps(original)
    def create_predictor(config):
        config.delete_pass("inplace_pass")
        return original(config)

    paddle.inference.create_predictor = create_predictor


SHIMS = {
    f.__name__: f
    for f in (
        c_identity,
        c_concat,
        c_softmax_with_cross_entropy,
        gloo_calc_stream,
        gloo_reduce_scatter,
        broadcast_input_data,
        tensor_fusion_cpu,
        param_storage_cpu,
        parallel_env_device_id,
        export_without_top_p,
        predictor_without_inplace_pass,
    )
}


def apply(names):
    unknown = [n for n in names if n not in SHIMS]
    if unknown:
        raise SystemExit(f"unknown cpu shim(s) {', '.join(unknown)}; known: {', '.join(SHIMS)}")
    for name in names:
        SHIMS[name]()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = []
    if argv and argv[0].startswith("--shims="):
        names = [n for n in argv.pop(0)[len("--shims="):].split(",") if n]
    if not argv:
        raise SystemExit("usage: python -m llamapipe.npu.cpu_shims [--shims=NAME,...] SCRIPT [ARGS...]")
    apply(names)
    sys.argv = argv  # the script sees exactly the arguments the NPU run passes it
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
