"""predict: batched greedy decode of the dev prompts with Paddle's inference predictor.

Loads only the exported graph (no model code). On CPU the PIR ``inplace_pass`` together with
oneDNN corrupts the decode loop after the first token; deleting that pass keeps oneDNN's speed
and gives tokens identical to dygraph greedy (tested).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from llamapipe.atomic import write_json
from llamapipe.errors import PipelineError
from llamapipe.tokenizer_io import decode_generated, left_padded_batch, load_tokenizer

log = logging.getLogger("llamapipe.predict")


class StaticGreedyPredictor:
    def __init__(self, inference_dir: str, threads: int = 1, device: str = "cpu"):
        from paddle import inference

        self.dir = Path(inference_dir)
        self.export = json.loads((self.dir / "export_config.json").read_text())
        prefix = self.dir / self.export["model_prefix"]
        config = inference.Config(str(prefix) + ".json", str(prefix) + ".pdiparams")
        if device == "cpu":
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads)
            config.delete_pass("inplace_pass")
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.tok = load_tokenizer(str(self.dir), padding_side="left")

    def generate_ids(self, srcs: list[Any], max_new_tokens: int) -> np.ndarray:
        feeds = left_padded_batch(self.tok, srcs, self.export["src_length"])
        feeds["max_new_tokens"] = np.array([max_new_tokens], dtype="int64")
        feeds["top_k"] = np.array([1], dtype="int64")  # greedy
        for name in self.predictor.get_input_names():
            self.predictor.get_input_handle(name).copy_from_cpu(feeds[name])
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()

    def generate(self, srcs: list[Any], max_new_tokens: int) -> list[str]:
        ids = self.generate_ids(srcs, max_new_tokens)
        return [decode_generated(self.tok, row, self.export["eos_token_id"]) for row in ids]


def read_records(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(params: dict[str, Any], inference_dir: str, dev_file: str, out_file: str, threads: int = 1,
        device: str = "cpu") -> dict[str, Any]:
    predictor = StaticGreedyPredictor(inference_dir, threads=threads, device=device)
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
    summary = {"records": len(predictions), "seconds": round(elapsed, 3), "batch_size": batch}
    log.info("wrote %d predictions to %s in %.1fs", len(predictions), out_file, elapsed)
    return summary
