"""Concurrent requests into the engine's batch path: one decoding thread, a bounded queue.

An idle decoding thread takes the first request, then what follows it closely (until
``window_s`` passes without an arrival, ``GROWTH`` windows at most, up to ``max_batch``). An
engine that decodes step by step (``Engine.step_batch``: the step graph) then takes new requests
into the running rows between steps and answers each as soon as it is done (continuous
batching, ``serving.continuous``); any other engine decodes the collected batch whole. The
engine is never called from two threads, and a request never waits on a thread of its own.
Results and streamed text go back to the event loop that submitted them.
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


STOP = object()  # stop()'s mark in the queue: what is queued before it is still answered


@dataclass
class Pending:
    prompt: str
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future
    stream: asyncio.Queue | None = None  # texts so far, when the client streams
    queued_at: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # the batch it was decoded in (reported to the client)
    prompt_tokens: int = 0  # counted when the request was checked (0: not counted yet)


class Batcher:
    GROWTH = 4  # a batch collects for at most this many windows

    def __init__(self, engine: Engine, max_batch: int, window_s: float, max_queue: int):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.max_queue = max_queue
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="llamapipe-decode", daemon=True)
        self.batch_sizes: Counter = Counter()  # batch size -> batches decoded (continuous: requests admitted together)
        self.rows_per_step: Counter = Counter()  # continuous batching: rows decoding together -> steps
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Decode what is queued, then end the thread."""
        self._queue.put(STOP)
        self._thread.join(timeout)

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, prompt: str, max_tokens: int, stream: bool = False, prompt_tokens: int = 0) -> Pending:
        loop = asyncio.get_running_loop()
        item = Pending(prompt, max_tokens, loop, loop.create_future(), asyncio.Queue() if stream else None,
                       prompt_tokens=prompt_tokens)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting; serve.max_queue sets it)") from None
        return item

    def _collect(self, first: Pending) -> tuple[list[Pending], bool]:
        """The first request and those that follow it closely: each arrival gives the next one
        ``window_s`` more (clients answered together come back spread out), up to the cap, and
        the batch waits ``GROWTH`` windows at most in all."""
        batch, now = [first], time.monotonic()
        last_call, quiet = now + self.GROWTH * self.window_s, now + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(min(quiet, last_call) - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is STOP:
                return batch, True
            batch.append(item)
            quiet = time.monotonic() + self.window_s
        return batch, False

    def _run(self) -> None:
        steps = self.engine.step_batch()
        if steps is not None:
            self._run_continuous(steps)
            return
        while True:
            first = self._queue.get()
            stopping = first is STOP
            if not stopping:
                batch, stopping = self._collect(first)
                self._decode(batch)
            if stopping:  # stop(): decode what is still queued, then end
                rest = [item for item in iter(self._get_nowait, None) if item is not STOP]
                for b in range(0, len(rest), self.max_batch):
                    self._decode(rest[b: b + self.max_batch])
                return

    def _get_nowait(self) -> Any:
        """The next queued item (a Pending or STOP), None when the queue is empty."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run_continuous(self, steps: Any) -> None:
        """Requests join the decoding rows between steps (an idle batcher still collects a burst
        first) and leave when done: ``serving.continuous``."""
        stopping = False
        while True:
            arrivals: list[Pending] = []
            if not len(steps):
                if stopping:
                    return
                first = self._queue.get()
                if first is STOP:
                    return
                arrivals, stopping = self._collect(first)
            elif not stopping:
                while len(steps) + len(arrivals) < self.max_batch:
                    item = self._get_nowait()
                    if item is None or item is STOP:
                        stopping = item is STOP
                        break
                    arrivals.append(item)
            arrivals = [p for p in arrivals if not p.result.cancelled()]
            try:
                self.busy = True
                if arrivals:
                    self.batch_sizes[len(arrivals)] += 1
                    log.info("%d request(s) join %d decoding", len(arrivals), len(steps))
                    counts = [p.prompt_tokens or self.engine.prompt_tokens(p.prompt) for p in arrivals]
                    self._finish(steps, steps.admit([p.prompt for p in arrivals], [p.max_tokens for p in arrivals],
                                                    arrivals, counts))
                if len(steps):
                    self.rows_per_step[len(steps)] += 1
                    for row in steps.rows:
                        row.owner.batch_size = max(row.owner.batch_size, len(steps))
                    self._finish(steps, steps.step())
                    self._stream(steps)
            except Exception as exc:  # every row decoding now gets a 500, the batcher carries on
                log.exception("decoding %d rows failed", len(steps) + len(arrivals))
                failed = {id(p): p for p in arrivals}
                failed.update({id(r.owner): r.owner for r in steps.rows})
                for p in failed.values():
                    p.loop.call_soon_threadsafe(_settle, p, exc)
                steps = self.engine.step_batch()
            finally:
                self.busy = False

    def _finish(self, steps: Any, rows: list) -> None:
        for row in rows:
            row.owner.batch_size = max(row.owner.batch_size, 1)
            if row.owner.stream is not None:
                row.owner.loop.call_soon_threadsafe(row.owner.stream.put_nowait, steps.text(row))
            row.owner.loop.call_soon_threadsafe(_settle, row.owner, steps.completion(row))

    @staticmethod
    def _stream(steps: Any) -> None:
        for row in steps.rows:
            if row.owner.stream is not None:
                row.owner.loop.call_soon_threadsafe(row.owner.stream.put_nowait, steps.text(row))

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
