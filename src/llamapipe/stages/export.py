"""export: the merged model's greedy decode loop as a Paddle static graph (PIR json + pdiparams).

Why not ``model.to_static`` (what upstream export does for a plain model): on paddle 3.0 it
traces in SOT mode and the graph decodes the first token right and the rest wrong. Converting
the same ``sample_d2s`` loop with ``paddle.jit.to_static(full_graph=True)`` and an explicit
input spec decodes exactly what dygraph greedy ``generate`` does (tested).
"""

from __future__ import annotations

import logging
from typing import Any

from llamapipe.atomic import atomic_dir, write_json
from llamapipe.tokenizer_io import copy_tokenizer_files

log = logging.getLogger("llamapipe.export")

MODEL_PREFIX = "model"  # -> model.json + model.pdiparams
INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", "max_new_tokens", "top_k"]


def greedy_decoder(model: Any, pad_token_id: int, eos_token_id: int) -> Any:
    import paddle

    class GreedyDecoder(paddle.nn.Layer):
        """Wraps the library's static decode loop; predict feeds top_k=1 (greedy).

        top_k stays a graph input: a constant top_k is folded by the inference passes into a
        malformed IfOp ("size 0 of regions") on paddle 3.0.
        """

        # dy2static matches the input spec against parameter names: the first must be `self`.
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, max_new_tokens, top_k):
            ids, _ = self.inner.sample_d2s(
                input_ids, attention_mask, position_ids, None, max_new_tokens,
                pad_token_id, eos_token_id, top_k=top_k, top_p=None,
            )
            return ids

    return GreedyDecoder(model)


def input_spec() -> list:
    from paddle.static import InputSpec

    return [InputSpec([None, None], "int64", name) for name in INPUT_NAMES[:3]] + [
        InputSpec([1], "int64", name) for name in INPUT_NAMES[3:]
    ]


def run(params: dict[str, Any], merged_dir: str, out_dir: str) -> dict[str, Any]:
    import paddle
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=params["dtype"])
    model.eval()
    cfg = model.config
    decoder = greedy_decoder(model, cfg.pad_token_id, cfg.eos_token_id)
    static = paddle.jit.to_static(decoder, input_spec=input_spec(), full_graph=True)
    with atomic_dir(out_dir) as tmp:
        paddle.jit.save(static, str(tmp / MODEL_PREFIX))
        copy_tokenizer_files(merged_dir, tmp)
        # Lengths are baked into what predict may ask: keep predict consistent with export.
        export_config = {
            "model_prefix": MODEL_PREFIX,
            "inputs": INPUT_NAMES,
            "dtype": params["dtype"],
            "src_length": params["src_length"],
            "max_new_tokens": params["max_new_tokens"],
            "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "max_position_embeddings": cfg.max_position_embeddings,
        }
        write_json(tmp / "export_config.json", export_config)
    log.info("static graph -> %s/%s.{json,pdiparams}", out_dir, MODEL_PREFIX)
    return export_config
