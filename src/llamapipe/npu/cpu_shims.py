"""Run one of PaddleNLP's ``llm/`` scripts on CPU with the two work-arounds the rehearsal needs.

    python -m llamapipe.npu.cpu_shims predict/export_model.py --model_name_or_path ...

The NPU run calls the same scripts with plain ``python``; the rehearsal (``rehearsal: cpu``)
calls them through this module, which patches two upstream CPU bugs and then runs the script
unchanged as ``__main__`` (``runpy``), so its own argument parsing and code paths are untouched:

- ``GenerationMixin.to_static`` traces ``top_p_sampling``, which has no float32 CPU kernel
  ("Check data type error for op: top_p_sampling"): export with ``use_top_p=False`` (greedy and
  top-k decoding, which is all the predictor's ``greedy_search`` uses).
- Paddle Inference's PIR ``inplace_pass`` together with oneDNN breaks the exported decode loop
  on CPU (tokens after the first differ from dygraph): the predictor runs without that pass.

Listed, with reasons, in ``llamapipe.config.rehearsal`` (``npu.cpu_shims``). Python 3.9 compatible: it runs
inside the stage image.
"""

import functools
import runpy
import sys


def greedy_static_export() -> None:
    from paddlenlp.generation.utils import GenerationMixin

    original = GenerationMixin.to_static

    @functools.wraps(original)
    def to_static(self, path, config):
        return original(self, path, dict(config, use_top_p=False))

    GenerationMixin.to_static = to_static


def predictor_without_inplace_pass() -> None:
    import paddle.inference

    original = paddle.inference.create_predictor

    @functools.wraps(original)
    def create_predictor(config):
        config.delete_pass("inplace_pass")
        return original(config)

    paddle.inference.create_predictor = create_predictor


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m llamapipe.npu.cpu_shims SCRIPT [ARGS...]")
    greedy_static_export()
    predictor_without_inplace_pass()
    sys.argv = argv  # the script sees exactly the arguments the NPU run passes it
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
