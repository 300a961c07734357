"""Continuous batching on the step graph: requests join and leave the decoding batch between steps.

A static batch decodes until its longest answer ends and new requests wait for all of it. The
step graph (``export.graph: step``) keeps the KV cache outside the graph, in numpy, so the batch
can change between two steps: a new request's prompt is run alone first (its prefill, with an
empty cache, as the first step of ``StaticGreedyPredictor._decode_steps``), then its row joins
the running ones, the shorter side's cache and mask left-padded (masked, so never attended to);
a row that produced eos or reached its ``max_tokens`` leaves at once. Each row is decoded
exactly as in a batch of its own: its own mask, positions and cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamapipe.serving.engine import Completion


@dataclass
class Row:
    owner: Any  # what the batcher answers (its Pending)
    limit: int
    prompt_tokens: int
    generated: list[int] = field(default_factory=list)


class StepBatch:
    """The rows decoding now and their state: last token, mask (cache length + 1), next
    position, and the cache tensors [rows, length, ...]."""

    def __init__(self, predictor: Any):
        self.p = predictor
        export = predictor.export
        self.eos, self.pad = export["eos_token_id"], export["pad_token_id"]
        self.cache_info, self.dtype = export["cache"], export["dtype"]
        self.src_length = export["src_length"]
        graph = predictor.predictor
        names = export["inputs"] + [f"past_{i}" for i in range(self.cache_info["tensors"])]
        self.inputs = [graph.get_input_handle(n) for n in names]
        self.outputs = [graph.get_output_handle(n) for n in graph.get_output_names()]
        self.rows: list[Row] = []
        self.ids = self.mask = self.positions = None
        self.cache: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.rows)

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: list) -> tuple:
        for handle, value in zip(self.inputs, [ids, mask, positions, *cache]):
            handle.copy_from_cpu(value)
        self.p.predictor.run()
        return self.outputs[0].copy_to_cpu(), [o.copy_to_cpu() for o in self.outputs[1:]]

    def admit(self, prompts: list[str], limits: list[int], owners: list[Any], prompt_tokens: list[int]) -> list[Row]:
        """Prefill the new prompts, join their rows; the rows already done (eos or a limit of 1)."""
        from llamapipe.core.tokenizer_io import left_padded_batch

        feeds = left_padded_batch(self.p.tok, prompts, self.src_length)
        n = len(prompts)
        empty = [np.zeros([n, 0, *self.cache_info["shape"]], dtype=self.dtype)] * self.cache_info["tensors"]
        tokens, cache = self._run(feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], empty)
        rows = [Row(o, lim, pt, [int(t)]) for o, lim, pt, t in zip(owners, limits, prompt_tokens, tokens)]
        mask = np.concatenate([feeds["attention_mask"], np.ones((n, 1), dtype="int64")], axis=1)
        self._join(rows, tokens[:, None].astype("int64"), mask, feeds["position_ids"][:, -1:] + 1, cache)
        return self._leave()

    def step(self) -> list[Row]:
        """One token for every row; the rows that are done leave and are returned."""
        tokens, self.cache = self._run(self.ids, self.mask, self.positions, self.cache)
        for row, t in zip(self.rows, tokens):
            row.generated.append(int(t))
        self.ids = tokens[:, None].astype("int64")
        self.positions = self.positions + 1
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), dtype=self.mask.dtype)], axis=1)
        return self._leave()

    def _join(self, rows: list[Row], ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: list) -> None:
        if not self.rows:
            self.rows, self.ids, self.mask, self.positions, self.cache = rows, ids, mask, positions, cache
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old_mask, old_cache = _left_pad(self.mask, self.cache, width)
        new_mask, new_cache = _left_pad(mask, cache, width)
        self.rows = self.rows + rows
        self.ids = np.concatenate([self.ids, ids])
        self.positions = np.concatenate([self.positions, positions])
        self.mask = np.concatenate([old_mask, new_mask])
        self.cache = [np.concatenate([a, b]) for a, b in zip(old_cache, new_cache)]

    def _leave(self) -> list[Row]:
        done = [i for i, r in enumerate(self.rows) if r.generated[-1] == self.eos or len(r.generated) >= r.limit]
        if not done:
            return []
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        left = [self.rows[i] for i in done]
        self.rows = [self.rows[i] for i in keep]
        self.ids, self.positions, self.mask = self.ids[keep], self.positions[keep], self.mask[keep]
        self.cache = [c[keep] for c in self.cache]
        if self.rows:  # columns no remaining row attends to (left by the rows that went) are dropped
            start = int(np.argmax(self.mask.any(axis=0)))
            if start:
                self.mask = self.mask[:, start:]
                self.cache = [c[:, start:] for c in self.cache]
        return left

    def completion(self, row: Row) -> Completion:
        from llamapipe.core.tokenizer_io import decode_generated

        ended = row.generated[-1] == self.eos
        return Completion(text=decode_generated(self.p.tok, row.generated, self.eos), prompt_tokens=row.prompt_tokens,
                          completion_tokens=len(row.generated) - (1 if ended else 0),
                          finish_reason="stop" if ended else "length")

    def text(self, row: Row) -> str:
        from llamapipe.core.tokenizer_io import decode_generated

        return decode_generated(self.p.tok, row.generated, self.eos)


def _left_pad(mask: np.ndarray, cache: list, width: int) -> tuple:
    """Mask [rows, w] and cache [rows, w - 1, ...] left-padded to mask width ``width`` (zeros, masked)."""
    extra = width - mask.shape[1]
    if not extra:
        return mask, cache
    mask = np.concatenate([np.zeros((mask.shape[0], extra), dtype=mask.dtype), mask], axis=1)
    cache = [np.concatenate([np.zeros((c.shape[0], extra, *c.shape[2:]), dtype=c.dtype), c], axis=1) for c in cache]
    return mask, cache
