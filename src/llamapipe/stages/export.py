"""export: the merged model as a Paddle static graph (PIR json + pdiparams) for greedy decoding.

``export.graph`` picks what the graph holds:
- ``step`` (default): one decode step, the model's forward with its KV cache as inputs and
  outputs and the greedy argmax of the last position; predict drives the loop. Measured on CPU
  (bench/RESULTS.md, issue 12): with predict's defaults 1.6-2.2x the tokens/s of the loop graph
  as shipped at batch 8 and 2.0-4.8x at batch 1 on the default model, the same tokens: the loop
  graph runs ~250 small ops a step through the while interpreter (sampling, cache and stopping
  bookkeeping) where a step graph runs the forward only.
- ``loop``: the library's whole ``sample_d2s`` decode loop in one graph (``while`` op).

Why not ``model.to_static`` (what upstream export does for a plain model): on paddle 3.0 it
traces in SOT mode and the graph decodes the first token right and the rest wrong. Converting
with ``paddle.jit.to_static(full_graph=True)`` and an explicit input spec decodes exactly what
dygraph greedy ``generate`` does, for both graphs (tested).
"""

from __future__ import annotations

import logging
from typing import Any

from llamapipe.core.atomic import atomic_dir, write_json
from llamapipe.core.tokenizer_io import copy_tokenizer_files

log = logging.getLogger("llamapipe.export")

MODEL_PREFIX = "model"  # -> model.json + model.pdiparams
INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", "max_new_tokens", "top_k"]  # graph: loop
STEP_INPUT_NAMES = ["input_ids", "attention_mask", "position_ids"]  # graph: step, then past_0 ... past_{2L-1}


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


def step_decoder(model: Any) -> Any:
    import paddle

    layers = model.config.num_hidden_layers

    class GreedyStep(paddle.nn.Layer):
        """One decode step: (ids, mask over cache + ids, positions, cache) -> (next ids, cache).

        The cache is the model's own (key, value) per layer, [batch, length, kv_heads, head_dim],
        flattened to 2 x layers tensors; the first step feeds length-0 tensors (the prompt).
        The argmax is the one greedy ``generate`` takes, on the last position's logits.
        """

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            logits, present = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, past_key_values=cache, use_cache=True,
                                         return_dict=False)[:2]
            return [paddle.argmax(logits[:, -1, :], axis=-1)] + [t for kv in present for t in kv]

    return GreedyStep(model)


def cache_shape(cfg: Any) -> list:
    """One cache tensor's shape, batch and length left open: [batch, length, kv_heads, head_dim]."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return [None, None, heads, cfg.hidden_size // cfg.num_attention_heads]


def step_input_spec(cfg: Any, dtype: str) -> list:
    from paddle.static import InputSpec

    return [InputSpec([None, None], "int64", name) for name in STEP_INPUT_NAMES] + [
        [InputSpec(cache_shape(cfg), dtype, f"past_{i}") for i in range(2 * cfg.num_hidden_layers)]
    ]


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
    graph = params.get("graph", "step")
    if graph == "step":
        static = paddle.jit.to_static(step_decoder(model), input_spec=step_input_spec(cfg, params["dtype"]),
                                      full_graph=True)
    else:
        decoder = greedy_decoder(model, cfg.pad_token_id, cfg.eos_token_id)
        static = paddle.jit.to_static(decoder, input_spec=input_spec(), full_graph=True)
    with atomic_dir(out_dir) as tmp:
        paddle.jit.save(static, str(tmp / MODEL_PREFIX))
        copy_tokenizer_files(merged_dir, tmp)
        # Lengths are baked into what predict may ask: keep predict consistent with export.
        export_config = {
            "model_prefix": MODEL_PREFIX,
            "graph": graph,
            "inputs": STEP_INPUT_NAMES if graph == "step" else INPUT_NAMES,
            "cache": {"tensors": 2 * cfg.num_hidden_layers, "shape": cache_shape(cfg)[2:]} if graph == "step" else None,
            "dtype": params["dtype"],
            "src_length": params["src_length"],
            "max_new_tokens": params["max_new_tokens"],
            "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "max_position_embeddings": cfg.max_position_embeddings,
        }
        write_json(tmp / "export_config.json", export_config)
    log.info("static graph (%s) -> %s/%s.{json,pdiparams}", graph, out_dir, MODEL_PREFIX)
    return export_config
