"""Concurrent requests into the engine's batch path: one decoding thread, short collection window.

A request waits in a bounded queue; the decoding thread takes the first one, then whatever else
arrives within ``window_s`` (up to ``max_batch``), and decodes them as one batch. The engine is
never called from two threads, and a request never waits on a thread of its own. Results and
streamed text go back to the event loop that submitted them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llamapipe.serving.engine import Completion, Engine

log = logging.getLogger("llamapipe.serve")


class QueueFull(Exception):
    pass


@dataclass
class Pending:
    prompt: str
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future
    stream: asyncio.Queue | None = None  # texts so far, when the client streams
    queued_at: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # the batch it was decoded in (reported to the client)


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, window_s: float, max_queue: int):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.max_queue = max_queue
        self._queue: queue.Queue[Pending | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="llamapipe-decode", daemon=True)
        self.batch_sizes: Counter = Counter()  # batch size -> batches decoded
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Decode what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, prompt: str, max_tokens: int, stream: bool = False) -> Pending:
        loop = asyncio.get_running_loop()
        item = Pending(prompt, max_tokens, loop, loop.create_future(), asyncio.Queue() if stream else None)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting; serve.max_queue sets it)") from None
        return item

    def _collect(self, first: Pending) -> tuple[list[Pending], bool]:
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            stopping = first is None
            if first is not None:
                batch, stopping = self._collect(first)
                self._decode(batch)
            if stopping:  # stop(): decode what is still queued, then end
                rest = [item for item in iter(self._get_nowait, None)]
                for b in range(0, len(rest), self.max_batch):
                    self._decode(rest[b: b + self.max_batch])
                return

    def _get_nowait(self) -> Pending | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _decode(self, batch: list[Pending]) -> None:
        live = [p for p in batch if not p.result.cancelled()]
        if not live:
            return
        self.busy = True
        started = time.monotonic()
        streams = [p for p in live if p.stream is not None]

        def on_text(texts: list[str]) -> None:
            for p, text in zip(live, texts):
                if p.stream is not None:
                    p.loop.call_soon_threadsafe(p.stream.put_nowait, text)

        try:
            done: list[Any] = self.engine.generate([p.prompt for p in live], [p.max_tokens for p in live],
                                                   on_text if streams else None)
        except Exception as exc:  # the server answers 500 for these requests and keeps serving
            log.exception("decoding a batch of %d failed", len(live))
            done = [exc] * len(live)
        finally:
            self.busy = False
        self.batch_sizes[len(live)] += 1
        log.info("batch of %d decoded in %.2fs (waited up to %.2fs)", len(live), time.monotonic() - started,
                 started - min(p.queued_at for p in live))
        for p, outcome in zip(live, done):
            p.batch_size = len(live)
            p.loop.call_soon_threadsafe(_settle, p, outcome)


def _settle(p: Pending, outcome: Any) -> None:
    if p.stream is not None:
        p.stream.put_nowait(None)  # end of the text updates
    if p.result.cancelled():
        return
    if isinstance(outcome, Completion):
        p.result.set_result(outcome)
    else:
        p.result.set_exception(outcome)
