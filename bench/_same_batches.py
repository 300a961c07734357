"""A comparison aid of bench/tp_rehearsal.py only (never the pipeline): one process draws the
batches that several processes' sampler draws, then upstream's script runs through the CPU shims.

PaddleNLP's ``Trainer._get_train_sampler`` uses ``paddle.io.BatchSampler(shuffle=True)`` when the
world size is 1 and ``DistributedBatchSampler`` (numpy ``RandomState(epoch)`` order) otherwise:
two orders of the same data. Here the shuffled one-process sampler is
``DistributedBatchSampler(num_replicas=1, rank=0)``, the order a tensor-parallel run (one data
rank) reads, so a per-step loss comparison compares the training, not the data order.

    python -m paddle.distributed.launch ... bench/_same_batches.py --shims=... run_finetune.py ...
"""

import paddle.io
import paddlenlp.trainer  # noqa: F401  its own BatchSampler subclasses are made from the original first

from llamapipe.npu import cpu_shims

_original = paddle.io.BatchSampler


def batch_sampler(dataset=None, sampler=None, shuffle=False, batch_size=1, drop_last=False):
    if dataset is not None and shuffle:
        return paddle.io.DistributedBatchSampler(dataset, batch_size=batch_size, num_replicas=1, rank=0,
                                                 shuffle=True, drop_last=drop_last)
    return _original(dataset=dataset, sampler=sampler, shuffle=shuffle, batch_size=batch_size, drop_last=drop_last)


paddle.io.BatchSampler = batch_sampler

if __name__ == "__main__":
    cpu_shims.main()
