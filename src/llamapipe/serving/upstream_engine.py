"""Upstream's predictor behind the serving interface (target npu and its rehearsal).

``UpstreamEngine`` builds PaddleNLP's own predictor the way ``llm/predict/predictor.py``'s
``predict()`` does: its ``PdArgumentParser((PredictorArgument, ModelArgument))`` over the predict
rule's predictor flags (``llamapipe.npu.upstream_args.serving_predictor_args``), then its
``create_predictor(predictor_args, model_args)``; each batch is its ``predictor.predict(texts)``,
the call ``predict()``'s loop makes per batch. On the cards (``--inference_model --block_attn``)
that is ``StaticGraphBlockInferencePredictor``, on the rehearsal (neither flag)
``StaticGraphPredictor``; the exported graph and the tokenizer are upstream's, as the predict
rule's predictions are.

Decode lengths. Upstream's predictor decodes a batch with ``PredictorArgument.max_length``
(``--max_length``, set by ``predict.max_new_tokens``); a request may ask for fewer tokens
(``max_tokens``). Both static graphs take the length as an input, so a batch is decoded no
longer than it needs, then each row is cut to its own limit:
- ``StaticGraphPredictor`` feeds ``max_new_tokens = config.max_length`` (one value for the
  batch): ``config.max_length`` is set to the batch's largest limit for the call;
- ``StaticGraphBlockInferencePredictor`` feeds ``model_inputs["max_length"]``, one value per row
  (``[batch_size, 1]``): each row gets its own limit, the rows upstream pads the batch with 1;
  ``config.max_length`` stays (it sizes the block tables and ``pre_ids``);
- any row longer than its limit is cut on its token ids (``predict(..., return_tokens=True)``)
  and decoded as upstream decodes (``batch_decode(skip_special_tokens=True,
  clean_up_tokenization_spaces=False)``); a row within its limit keeps upstream's own text.
Upstream's block predictor holds ``batch_size`` rows (``--batch_size``, ``predict.batch_size``):
larger batches are decoded ``batch_size`` rows at a time.

Streaming: upstream's static predictors return whole texts (only its ``DygraphPredictor`` has a
``stream_predict``, a ``TextIteratorStreamer`` over dygraph ``generate``, not usable with the
exported graph), so ``on_text`` is called once a sub-batch is decoded: a streamed completion
arrives in one chunk.

Imported inside the stage image (Python 3.9); Paddle and PaddleNLP are imported in ``__init__``
only. Upstream's ``llm/predict/predictor.py`` is imported as ``predict.predictor`` (as upstream's
own ``flask_server.py`` does), from the checkout's ``llm/`` on ``sys.path``: the serve script runs
from there with predict's PYTHONPATH.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llamapipe.core.errors import PipelineError
from llamapipe.serving.engine import Completion, Engine, EngineInfo, Limits, TextCallback

log = logging.getLogger("llamapipe.serve")

UPSTREAM_MODULE = "predict.predictor"  # llm/predict/predictor.py, with llm/ on sys.path
NOT_SERVING_FLAGS = ("--data_file", "--output_file")  # predictor.py's file loop: requests replace it
SRC_LENGTH_KEY = "sft.src_length"  # --src_length (upstream_args.predictor_args)
MAX_LENGTH_KEY = "predict.max_new_tokens"  # --max_length (upstream_args.predictor_args)


def _flag_names(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _exported_files_missing(model_dir: str) -> list[str]:
    """What upstream's predictor needs from export_model.py's output (``check-outputs --kind export``)."""
    missing = [n for n in ("config.json", "model.pdiparams") if not os.path.isfile(os.path.join(model_dir, n))]
    if not any(os.path.isfile(os.path.join(model_dir, n)) for n in ("model.json", "model.pdmodel")):
        missing.append("model.json or model.pdmodel")
    return missing


class UpstreamEngine(Engine):
    """PaddleNLP's ``llm/predict/predictor.py`` predictor, built and called as its ``predict()`` does."""

    def __init__(self, predictor_argv: list[str], predict_params: dict[str, Any], model_name: str):
        argv = list(predictor_argv)
        given = [f for f in _flag_names(argv) if f in NOT_SERVING_FLAGS]
        if given:
            raise PipelineError(f"upstream predictor flags {', '.join(given)} have no use in serving (requests are "
                                "the prompts): pass upstream_args.serving_predictor_args")
        upstream = self._import_upstream()
        from paddlenlp.trainer import PdArgumentParser
        from paddlenlp.trl import llm_utils

        parser = PdArgumentParser((upstream.PredictorArgument, upstream.ModelArgument))
        try:
            # look_for_args_file=False: our argv is the whole configuration (no <script>.args file)
            predictor_args, model_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        except (ValueError, AssertionError) as err:
            raise PipelineError(f"upstream's PredictorArgument refused the predictor flags {argv}: {err}") from None
        model_dir = predictor_args.model_name_or_path
        missing = _exported_files_missing(model_dir or "")
        if missing:
            raise PipelineError(f"{model_dir} holds no exported model (missing {', '.join(missing)}): run the "
                                "pipeline's export first (snakemake results/inference, with your --config)")
        import paddle

        if paddle.distributed.get_world_size() > 1:
            raise PipelineError("the upstream engine serves from one process on one card (the predict rule's); "
                                f"this process is one of {paddle.distributed.get_world_size()}")
        llm_utils.set_triton_cache(model_dir, predictor_args.mode)  # as predict() does before create_predictor
        self.upstream = upstream
        self.predictor_args = predictor_args
        self.predictor = upstream.create_predictor(predictor_args, model_args)
        self.tokenizer = self.predictor.tokenizer
        self.eos_ids = set(int(i) for i in llm_utils.get_eos_token_id(
            self.tokenizer, getattr(self.predictor, "generation_config", None)))
        self.batch_size = max(1, int(predictor_args.batch_size))
        self.max_length = int(predictor_args.max_length)
        self.block = isinstance(self.predictor, upstream.BlockInferencePredictorMixin)
        default = int(predict_params.get("max_new_tokens") or self.max_length)
        self.info = EngineInfo(
            model=model_name,
            limits=Limits(src_length=int(predictor_args.src_length), max_new_tokens=self.max_length,
                          src_length_key=SRC_LENGTH_KEY, max_new_tokens_key=MAX_LENGTH_KEY,
                          max_new_tokens_fix="raise it up to export.max_new_tokens, no rerun needed",
                          default_max_tokens=min(default, self.max_length)),
            details={"engine": f"PaddleNLP llm/predict/predictor.py {type(self.predictor).__name__}",
                     "upstream_batch_size": self.batch_size, "device": predictor_args.device,
                     "dtype": predictor_args.dtype, "mode": predictor_args.mode,
                     "inference_model": bool(predictor_args.inference_model),
                     "block_attn": bool(predictor_args.block_attn), "predictor_argv": argv},
        )
        log.info("upstream engine: %s on %s (%s), batches of %d, prompts up to %d tokens, up to %d new tokens",
                 type(self.predictor).__name__, predictor_args.device, predictor_args.dtype, self.batch_size,
                 predictor_args.src_length, self.max_length)

    @staticmethod
    def _import_upstream() -> Any:
        import importlib

        try:
            return importlib.import_module(UPSTREAM_MODULE)
        except ImportError as err:
            raise PipelineError(f"cannot import upstream's llm/predict/predictor.py as {UPSTREAM_MODULE} ({err}): "
                                "start the server from the PaddleNLP checkout's llm/ with it on PYTHONPATH, as "
                                "llamapipe.npu.serve_script does") from None

    # --- the serving interface -----------------------------------------------------------------

    def _source(self, prompt: str) -> str:
        """The text upstream's ``_preprocess`` tokenizes (its chat template when the tokenizer has one)."""
        if self.tokenizer.chat_template is not None:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False)
        return prompt

    def prompt_tokens(self, prompt: str) -> int:
        ids = self.tokenizer(self._source(prompt), add_special_tokens=self.tokenizer.chat_template is None)["input_ids"]
        return len(ids)

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_text: TextCallback | None = None) -> list[Completion]:
        if len(prompts) != len(max_new_tokens):
            raise ValueError("one max_new_tokens per prompt")
        limits = [max(1, min(int(n), self.max_length)) for n in max_new_tokens]
        done: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            done += self._batch(list(prompts[start:start + self.batch_size]), limits[start:start + self.batch_size])
            if on_text is not None:
                on_text([c.text for c in done] + [""] * (len(prompts) - len(done)))
        return done

    def _batch(self, prompts: list[str], limits: list[int]) -> list[Completion]:
        with self._decode_lengths(limits):
            # a copy: the block predictor pads the list it is given to batch_size in place
            texts, rows = self.predictor.predict(list(prompts), return_tokens=True)
        done = []
        for prompt, text, row, limit in zip(prompts, texts, rows, limits):
            tokens, ended = self._completion_ids(row)
            if len(tokens) > limit:  # decoded for a longer row of the batch
                tokens, ended = tokens[:limit], False
                text = self.tokenizer.batch_decode([tokens], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)[0]
            done.append(Completion(text=text, prompt_tokens=self.prompt_tokens(prompt),
                                   completion_tokens=len(tokens),
                                   finish_reason="length" if not ended and len(tokens) >= limit else "stop"))
        return done

    def _completion_ids(self, row: Any) -> tuple[list[int], bool]:
        """A row of generated ids up to its first eos (upstream fills a finished row with pad / eos)."""
        ids = [int(t) for t in (row.tolist() if hasattr(row, "tolist") else row)]
        for i, token in enumerate(ids):
            if token in self.eos_ids:
                return ids[:i], True
        return ids, False

    @contextmanager
    def _decode_lengths(self, limits: list[int]) -> Iterator[None]:
        """The batch decoded no longer than its longest row needs (see the module docstring)."""
        predictor, config = self.predictor, self.predictor.config
        if self.block:
            import numpy as np

            lengths = predictor.model_inputs["max_length"]
            rows = limits + [1] * (self.batch_size - len(limits))  # upstream pads the batch with "" rows
            lengths.set_value(np.array(rows, dtype="int64").reshape([-1, 1]))
            try:
                yield
            finally:
                lengths.set_value(np.full([self.batch_size, 1], config.max_length, dtype="int64"))
        elif isinstance(predictor, self.upstream.StaticGraphPredictor):
            config.max_length = max(limits)
            try:
                yield
            finally:
                config.max_length = self.max_length
        else:  # another upstream predictor: decode with its max_length, cut each row
            yield
