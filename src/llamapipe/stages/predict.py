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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError
from llamapipe.core.jsonl import BLANK, BadLine, json_value, numbered_lines
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


StepCallback = Callable[[np.ndarray], None]


def _row_limits(max_new_tokens: int | Sequence[int], rows: int) -> np.ndarray:
    if isinstance(max_new_tokens, (int, np.integer)):
        return np.full(rows, int(max_new_tokens), dtype="int64")
    limits = np.asarray(list(max_new_tokens), dtype="int64")
    if limits.shape != (rows,):
        raise ValueError(f"{limits.shape[0]} limits for {rows} rows")
    return limits


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

    def generate_ids(self, srcs: list[Any], max_new_tokens: int | Sequence[int],
                     on_step: StepCallback | None = None) -> np.ndarray:
        """Generated ids [batch, steps] (rows that ended early are padded after their eos).

        ``max_new_tokens``: one limit, or one per row (a server's batch mixes requests); a row
        past its limit counts as finished, so decoding stops once every row is done.
        ``on_step(ids_so_far)`` is called after every decoded step (the step graph) or once (the
        loop graph): what streaming reads."""
        limits = _row_limits(max_new_tokens, len(srcs))
        if self.export.get("graph", "loop") == "step":
            return self._decode_steps(srcs, limits, on_step)
        feeds = left_padded_batch(self.tok, srcs, self.export["src_length"])
        feeds["max_new_tokens"] = np.array([int(limits.max())], dtype="int64")
        feeds["top_k"] = np.array([1], dtype="int64")  # greedy
        for name in self.predictor.get_input_names():
            self.predictor.get_input_handle(name).copy_from_cpu(feeds[name])
        self.predictor.run()
        ids = self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()
        if on_step is not None:
            on_step(ids)
        return ids

    def _decode_steps(self, srcs: list[Any], limits: np.ndarray, on_step: StepCallback | None) -> np.ndarray:
        """Greedy decoding with the step graph, as greedy ``generate`` does it: the prompt first
        (with an empty cache), then one token a step; the mask grows by one, positions count on,
        a row that produced eos gets pad from then on, and decoding stops when every row has
        produced eos or reached its limit."""
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
        for step in range(int(limits.max())):
            for handle, value in zip(inputs, [ids, mask, positions, *cache]):
                handle.copy_from_cpu(value)
            p.run()
            tokens = np.where(running, outputs[0].copy_to_cpu(), pad)
            cache = [o.copy_to_cpu() for o in outputs[1:]]
            generated.append(tokens)
            if on_step is not None:
                on_step(np.stack(generated, axis=1))
            running &= (tokens != eos) & (limits > step + 1)
            if not running.any():
                break
            ids = tokens[:, None].astype("int64")
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        return np.stack(generated, axis=1)

    def generate(self, srcs: list[Any], max_new_tokens: int | Sequence[int]) -> list[str]:
        ids = self.generate_ids(srcs, max_new_tokens)
        return [decode_generated(self.tok, row, self.export["eos_token_id"]) for row in ids]


def read_records(path: str) -> list[dict[str, Any]]:
    """The prompts of a JSON-lines file (the dev split, or a user's own): one object a line with a
    ``src`` (a string, or a list of strings: turns) and, if known, a ``tgt``; blank lines are
    skipped. A line that is anything else stops with one line naming the file and the line."""
    records = []
    try:
        with open(path, "rb") as f:  # binary, decoded a line at a time: a bad byte names its line
            for number, raw in numbered_lines(f):
                record = _record(raw)
                if isinstance(record, str):
                    raise PipelineError(f'{path} line {number}: {record} (each line: a JSON object with "src", '
                                        f'a string or a list of strings; "tgt" optional)')
                if record is not None:
                    records.append(record)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the prompts: {exc.strerror or exc}") from None
    return records


JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
              type(None): "null"}


def _record(raw: bytes) -> dict[str, Any] | str | None:
    """One line's record, None for a blank line, or what is wrong with it."""
    try:
        record = json_value(raw)
    except BadLine as exc:
        return str(exc)
    if record is BLANK:
        return None
    if not isinstance(record, dict):
        return f"{JSON_KINDS.get(type(record), type(record).__name__)}, not a JSON object"
    if "src" not in record:
        keys = ", ".join(json.dumps(k, ensure_ascii=False) for k in record) or "none"
        return f'no "src" (its keys: {keys})'
    src = record["src"]
    if isinstance(src, str) or (isinstance(src, list) and src and all(isinstance(s, str) for s in src)):
        return record
    if isinstance(src, list):
        return '"src" is an empty list' if not src else '"src" is a list with an item that is not a string'
    return f'"src" is {JSON_KINDS.get(type(src), type(src).__name__)}'


def prediction_record(record: dict[str, Any], prediction: str) -> dict[str, Any]:
    """One entry of predictions.json: the prompt's ``src``, its ``tgt`` when it has one (the dev
    split always does; evaluate scores against it), and the ``prediction``."""
    out = {"src": record["src"]}
    if "tgt" in record:
        out["tgt"] = record["tgt"]
    out["prediction"] = prediction
    return out


# Every key of the predict section (config.yaml `predict:`, the schema's); a --params that lacks one
# gets it from config.yaml, else from the defaults (resolve_params).
PREDICT_KEYS = ("batch_size", "max_new_tokens", "limit", *INFERENCE_SETTINGS)
CONFIG_FILE = "config.yaml"


def resolve_params(given: dict[str, Any] | None, inference_dir: str,
                   config_file: str = CONFIG_FILE) -> tuple[dict[str, Any], str]:
    """The predict settings a run uses and, in words, where they came from (also logged): the
    ``--params`` given, each key it lacks from ``config_file``'s predict section as the workflow
    resolves it, or without that file from the schema's predict defaults and the export's own
    ``max_new_tokens``. The pipeline gives every key: nothing is read then."""
    given = dict(given or {})
    if all(k in given for k in PREDICT_KEYS):
        params, source = given, "--params"
    else:
        defaults, source = default_params(inference_dir, config_file)
        params = {**defaults, **given}
        if given:
            source = f"--params ({', '.join(sorted(given))}), the rest from {source}"
    log.info("predict settings from %s", source)
    return params, source


def default_params(inference_dir: str, config_file: str = CONFIG_FILE) -> tuple[dict[str, Any], str]:
    """config.yaml's predict section (``llamapipe.config.load`` + ``stage_params``, as the predict
    rule gets it) or, without config.yaml, the schema's predict defaults with ``max_new_tokens``
    the longest decode the model in ``inference_dir`` was exported for."""
    import os

    if os.path.isfile(config_file):
        from llamapipe.config import load
        from llamapipe.config.stage_params import stage_params

        where = os.path.abspath(config_file)
        try:
            cfg = load(config_file)
        except PipelineError as exc:
            raise PipelineError(f"{where} gives the predict settings --params lacks, and it is not a valid "
                                f"config (give every predict key with --params to skip it): {exc}") from None
        return dict(stage_params("predict", cfg)), f"{where}'s predict section"
    from llamapipe.config.validation import config_schema

    section = config_schema()["properties"]["predict"]["properties"]
    params = {k: v["default"] for k, v in section.items() if "default" in v}
    export_file = _export_config_file(inference_dir)
    params["max_new_tokens"] = int(json.loads(export_file.read_text(encoding="utf-8"))["max_new_tokens"])
    return params, (f"the schema's predict defaults (no {config_file} in {os.getcwd()}) and max_new_tokens "
                    f"{params['max_new_tokens']} from {export_file}")


def _export_config_file(inference_dir: str) -> Path:
    path = Path(inference_dir) / "export_config.json"
    if not path.is_file():
        raise PipelineError(f"{inference_dir}: no export_config.json; --inference takes the export stage's "
                            f"output directory (results/inference)")
    return path


def run(params: dict[str, Any], inference_dir: str, dev_file: str, out_file: str, threads: int = 1,
        device: str = "cpu") -> dict[str, Any]:
    """Greedy predictions for every record of ``dev_file`` (``read_records``) into ``out_file``:
    ``{"src", "tgt", "prediction"}`` each, ``tgt`` only where the record has one. ``params``: the
    whole predict section (``resolve_params`` completes a partial one)."""
    missing = [k for k in ("batch_size", "max_new_tokens") if k not in params]
    if missing:
        raise PipelineError(f"predict: params lack {', '.join(missing)} (resolve_params fills them in)")
    _export_config_file(inference_dir)
    records = read_records(dev_file)  # a bad line stops before the model is loaded
    if not records:
        raise PipelineError(f"{dev_file}: no prompts in it")
    predictor = StaticGreedyPredictor(inference_dir, threads=threads, device=device, settings=params)
    max_new = params["max_new_tokens"]
    if max_new > predictor.export["max_new_tokens"]:
        raise PipelineError(
            f"predict.max_new_tokens={max_new} exceeds the {predictor.export['max_new_tokens']} the model "
            f"was exported for; rerun export with the new length"
        )
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
    predictions = [prediction_record(r, outputs[i]) for i, r in enumerate(records)]
    write_json(out_file, predictions)
    summary = {"records": len(predictions), "seconds": round(elapsed, 3), "batch_size": batch,
               "inference": predictor.settings}
    log.info("wrote %d predictions to %s in %.1fs", len(predictions), out_file, elapsed)
    return summary
