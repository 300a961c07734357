"""The engine a server or chat decodes with: the predict stage's own, behind one small interface.

``LocalEngine`` (target cpu) is predict's ``StaticGreedyPredictor`` over ``results/inference``:
the same graph, tokenizer, settings and greedy decode that wrote ``results/predictions.json``.
``llamapipe.serving.upstream_engine`` (target npu and its rehearsal) puts upstream's predictor
behind the same interface. The prompt is what sft trained on: the bare source text (bos + its
tokens, no template); turns of a conversation are joined by newlines, as a multi-turn ``src``
list is (``tokenizer_io.join_text``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# texts decoded so far, one per row: called while a batch decodes (streaming reads it)
TextCallback = Callable[[list[str]], None]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": the model produced eos; "length": it reached its max_tokens


@dataclass
class Limits:
    """What the exported graph allows, with the config key that sets each (errors name it)."""

    src_length: int  # longest prompt in tokens, bos included
    max_new_tokens: int  # longest decode
    src_length_key: str = "sft.src_length"
    max_new_tokens_key: str = "export.max_new_tokens"
    max_new_tokens_fix: str = "rerun export to change it"  # how a user raises the limit
    default_max_tokens: int = 0  # a request without max_tokens decodes this many (predict.max_new_tokens)


@dataclass
class EngineInfo:
    model: str  # id in /v1/models
    limits: Limits
    details: dict[str, Any] = field(default_factory=dict)  # shown by /health


class Engine:
    """Greedy, batched, deterministic. Not thread-safe: one batch at a time (the batcher's thread)."""

    info: EngineInfo

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the graph's input (bos included), untruncated."""
        raise NotImplementedError

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_text: TextCallback | None = None) -> list[Completion]:
        raise NotImplementedError

    def step_batch(self) -> Any:
        """A ``serving.continuous.StepBatch`` when the engine decodes step by step (requests then
        join and leave between steps), else None (the batcher decodes whole batches)."""
        return None


def prompt_of_messages(contents: list[str]) -> str:
    """A conversation's turns (user, assistant, user, ...) as one prompt, the way sft's multi-turn
    sources are joined."""
    from llamapipe.core.tokenizer_io import join_text

    return join_text(list(contents))


class LocalEngine(Engine):
    """predict's static-graph greedy decoder (paddle.inference + sentencepiece, no PaddleNLP)."""

    def __init__(self, inference_dir: str, predict_params: dict[str, Any], threads: int = 1,
                 model_name: str | None = None, continuous: bool = True):
        from llamapipe.stages.predict import StaticGreedyPredictor

        self.predictor = StaticGreedyPredictor(inference_dir, threads=threads, settings=predict_params)
        self.continuous = continuous  # serve: rows join and leave between steps (the step graph)
        export = self.predictor.export
        default = min(int(predict_params.get("max_new_tokens") or export["max_new_tokens"]),
                      int(export["max_new_tokens"]))
        self.info = EngineInfo(
            model=model_name or "llamapipe-" + str(export.get("model_name", "tiny-llama")),
            limits=Limits(src_length=int(export["src_length"]), max_new_tokens=int(export["max_new_tokens"]),
                          default_max_tokens=default),
            details={"engine": "paddle.inference static graph (predict stage)", "graph": export.get("graph", "loop"),
                     "inference": self.predictor.settings},
        )

    def step_batch(self) -> Any:
        if self.predictor.export.get("graph", "loop") != "step" or not self.continuous:
            return None
        from llamapipe.serving.continuous import StepBatch

        return StepBatch(self.predictor)

    def prompt_tokens(self, prompt: str) -> int:
        from llamapipe.core.tokenizer_io import encode_prompt

        return len(encode_prompt(self.predictor.tok, prompt, 1 << 30))

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_text: TextCallback | None = None) -> list[Completion]:
        from llamapipe.core.tokenizer_io import decode_generated

        tok, eos = self.predictor.tok, self.predictor.export["eos_token_id"]

        def rows(ids: Any) -> list[list[int]]:
            out = []
            for row, limit in zip(ids, max_new_tokens):
                row = [int(t) for t in row[:limit]]
                out.append(row[: row.index(eos) + 1] if eos in row else row)
            return out

        def step(ids: Any) -> None:
            if on_text is not None:
                on_text([decode_generated(tok, r, eos) for r in rows(ids)])

        ids = self.predictor.generate_ids(prompts, max_new_tokens, on_step=step if on_text else None)
        done = []
        for prompt, row, _limit in zip(prompts, rows(ids), max_new_tokens):
            ended = bool(row) and row[-1] == eos
            done.append(Completion(text=decode_generated(tok, row, eos), prompt_tokens=self.prompt_tokens(prompt),
                                   completion_tokens=len(row) - (1 if ended else 0),
                                   finish_reason="stop" if ended else "length"))
        return done
