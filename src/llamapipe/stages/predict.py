"""predict: batched greedy decode of the dev prompts with Paddle's inference predictor.

Loads only the exported graph (no model code) and the sentencepiece tokenizer: this stage
imports Paddle, not PaddleNLP. A step graph (``export.graph: step``) is driven one token at a
time here, a loop graph decodes in one run. On CPU the PIR ``inplace_pass`` together with oneDNN
corrupts the loop graph after the first token, so the pass is deleted. Both give tokens identical
to dygraph greedy ``generate`` (tested).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError
from llamapipe.core.tokenizer_io import SentencePieceTokenizer, decode_generated, left_padded_batch

log = logging.getLogger("llamapipe.predict")


# paddle.inference settings of the predict section (config.yaml `predict:`), with the defaults
# the schema gives them; bench/RESULTS.md (issue 12, "Inference levers") has the measurements.
INFERENCE_SETTINGS = {
    "threads": 1,  # CPU math threads; None: the rule's threads
    "onednn": False,
    "onednn_cache_capacity": 0,  # oneDNN primitive cache, input shapes kept (0: Paddle's default, 10)
    "ir_optim": True,
    "new_executor": False,
}


def inference_settings(params: dict[str, Any] | None) -> dict[str, Any]:
    """The predictor's settings from a predict section: its keys over INFERENCE_SETTINGS."""
    params = params or {}
    return {k: params.get(k, default) for k, default in INFERENCE_SETTINGS.items()}


def inference_config(prefix: str, settings: dict[str, Any], threads: int = 1, device: str = "cpu") -> Any:
    """A ``paddle.inference.Config`` for the exported graph at ``prefix`` with these settings."""
    from paddle import inference

    config = inference.Config(prefix + ".json", prefix + ".pdiparams")
    if device == "cpu":
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(settings["threads"] or threads)
        if settings["onednn"]:
            config.enable_mkldnn()
            if settings["onednn_cache_capacity"]:
                config.set_mkldnn_cache_capacity(settings["onednn_cache_capacity"])
        else:
            config.disable_mkldnn()
        # With oneDNN the PIR inplace_pass corrupts the decode loop after the first token (it runs
        # even with ir_optim off); without oneDNN it is harmless, and deleting it costs nothing.
        config.delete_pass("inplace_pass")
    config.switch_ir_optim(settings["ir_optim"])
    if settings["new_executor"]:
        config.enable_new_executor()
    config.disable_glog_info()
    return config


class StaticGreedyPredictor:
    def __init__(self, inference_dir: str, threads: int = 1, device: str = "cpu",
                 settings: dict[str, Any] | None = None):
        from paddle import inference

        self.dir = Path(inference_dir)
        self.export = json.loads((self.dir / "export_config.json").read_text())
        self.settings = inference_settings(settings)
        prefix = str(self.dir / self.export["model_prefix"])
        self.predictor = inference.create_predictor(inference_config(prefix, self.settings, threads, device))
        self.tok = SentencePieceTokenizer(str(self.dir), padding_side="left")  # no PaddleNLP import

    def generate_ids(self, srcs: list[Any], max_new_tokens: int) -> np.ndarray:
        """Generated ids [batch, steps] (rows that ended early are padded after their eos)."""
        if self.export.get("graph", "loop") == "step":
            return self._decode_steps(srcs, max_new_tokens)
        feeds = left_padded_batch(self.tok, srcs, self.export["src_length"])
        feeds["max_new_tokens"] = np.array([max_new_tokens], dtype="int64")
        feeds["top_k"] = np.array([1], dtype="int64")  # greedy
        for name in self.predictor.get_input_names():
            self.predictor.get_input_handle(name).copy_from_cpu(feeds[name])
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()

    def _decode_steps(self, srcs: list[Any], max_new_tokens: int) -> np.ndarray:
        """Greedy decoding with the step graph, as greedy ``generate`` does it: the prompt first
        (with an empty cache), then one token a step; the mask grows by one, positions count on,
        a row that produced eos gets pad from then on, and decoding stops when every row has
        produced eos or after ``max_new_tokens``."""
        feeds = left_padded_batch(self.tok, srcs, self.export["src_length"])
        ids, mask, positions = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
        batch = ids.shape[0]
        cache_info, dtype = self.export["cache"], self.export["dtype"]
        cache = [np.zeros([batch, 0, *cache_info["shape"]], dtype=dtype)] * cache_info["tensors"]
        eos, pad = self.export["eos_token_id"], self.export["pad_token_id"]
        p = self.predictor
        names = self.export["inputs"] + [f"past_{i}" for i in range(cache_info["tensors"])]
        inputs = [p.get_input_handle(n) for n in names]
        outputs = [p.get_output_handle(n) for n in p.get_output_names()]  # next ids, then the cache in order
        generated, running = [], np.ones(batch, dtype=bool)
        for _ in range(max_new_tokens):
            for handle, value in zip(inputs, [ids, mask, positions, *cache]):
                handle.copy_from_cpu(value)
            p.run()
            tokens = np.where(running, outputs[0].copy_to_cpu(), pad)
            cache = [o.copy_to_cpu() for o in outputs[1:]]
            generated.append(tokens)
            running &= tokens != eos
            if not running.any():
                break
            ids = tokens[:, None].astype("int64")
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        return np.stack(generated, axis=1)

    def generate(self, srcs: list[Any], max_new_tokens: int) -> list[str]:
        ids = self.generate_ids(srcs, max_new_tokens)
        return [decode_generated(self.tok, row, self.export["eos_token_id"]) for row in ids]


def read_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(params: dict[str, Any], inference_dir: str, dev_file: str, out_file: str, threads: int = 1,
        device: str = "cpu") -> dict[str, Any]:
    predictor = StaticGreedyPredictor(inference_dir, threads=threads, device=device, settings=params)
    max_new = params["max_new_tokens"]
    if max_new > predictor.export["max_new_tokens"]:
        raise PipelineError(
            f"predict.max_new_tokens={max_new} exceeds the {predictor.export['max_new_tokens']} the model "
            f"was exported for; rerun export with the new length"
        )
    records = read_records(dev_file)
    if params.get("limit"):
        records = records[: params["limit"]]
    # Batch prompts of similar length together (less padding); output keeps the dev order.
    order = sorted(range(len(records)), key=lambda i: len(str(records[i]["src"])))
    outputs: dict[int, str] = {}
    batch = params["batch_size"]
    started = time.time()
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        for i, text in zip(idx, predictor.generate([records[i]["src"] for i in idx], max_new)):
            outputs[i] = text
        log.info("predicted %d/%d", min(b + batch, len(order)), len(order))
    elapsed = time.time() - started
    predictions = [{"src": r["src"], "tgt": r["tgt"], "prediction": outputs[i]} for i, r in enumerate(records)]
    write_json(out_file, predictions)
    summary = {"records": len(predictions), "seconds": round(elapsed, 3), "batch_size": batch,
               "inference": predictor.settings}
    log.info("wrote %d predictions to %s in %.1fs", len(predictions), out_file, elapsed)
    return summary
