"""Training progress on the terminal: step/total, loss, rate, elapsed and time left.

The sft rule's shell line is ``<command> 2>&1 | tee <log> | python -m llamapipe.stages.progress``:
the log file gets everything the job prints, the terminal the lines of our own loggers
(``core.logs.OUR_LINE``), plus, on the npu target, progress lines made from upstream's Trainer:

- cpu: our sft stage's Trainer callback (``llamapipe.stages.sft``) logs a ``Progress`` line at the
  first logged step, then at most one every ``PROGRESS_INTERVAL_S`` seconds, and at the last step;
- npu: upstream's script trains; its Trainer's "loss: ..., learning_rate: ..., global_step: N, ..."
  lines reach the rule's output through the launcher (which prints worker 0's log). The plan line
  our prepare step logs before the launcher starts ("training from scratch: 100 steps (upstream's
  run_finetune.py)", ``plan_message``) gives the total; this filter turns those lines into the same
  progress lines, on the terminal only (the log keeps upstream's own lines).

Stdlib only, Python 3.9: the filter runs where Snakemake runs, the helpers inside the stage image.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any, Callable

from llamapipe.core.logs import OUR_LINE, format_line, strip_ansi

PROGRESS_INTERVAL_S = 30.0  # at most one progress line per this many seconds (first and last step always)
LOGGER = "llamapipe.sft"

# PaddleNLP Trainer's log line: "loss: 7.66448736, learning_rate: 0.0006, global_step: 1, ..."
TRAINER_LINE = re.compile(r"\bloss: ([-+0-9.eE]+), learning_rate: ([-+0-9.eE]+), global_step: (\d+)")
_SAMPLES_PER_S = re.compile(r"\binterval_samples_per_second: ([0-9.eE+-]+)")
_PLAN = re.compile(r"training from scratch: (?P<fresh>\d+) steps|resuming from checkpoint-(?P<start>\d+) of "
                   r"(?P<total>\d+) steps")
_UPSTREAM = re.compile(r"\(upstream's [^)]+\)\s*$")
# when a line was written: ours "2026-12-06 10:00:00,123 INFO ...", PaddleNLP's "[2026-12-06 10:00:00,123] ..."
_STAMP = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\b")


def trainer_entry(line: str) -> dict[str, Any] | None:
    """The loss entry of one Trainer log line, or None."""
    m = TRAINER_LINE.search(line)
    if not m:
        return None
    entry: dict[str, Any] = {"step": int(m.group(3)), "loss": float(m.group(1)), "learning_rate": float(m.group(2))}
    rate = _SAMPLES_PER_S.search(line)
    if rate:
        entry["samples_per_second"] = float(rate.group(1))
    return entry


def plan_message(start: int, total: int, upstream_script: str | None = None) -> str:
    """What a run is about to do: one line, also read back by the terminal filter (``parse_plan``)."""
    text = f"training from scratch: {total} steps" if not start else (
        f"resuming from checkpoint-{start} of {total} steps" + ("" if start < total else ", none left to train"))
    return f"{text} (upstream's {upstream_script})" if upstream_script else text


def parse_plan(line: str) -> tuple[int, int, bool] | None:
    """(start step, total steps, upstream trains) of a ``plan_message`` line, or None."""
    m = _PLAN.search(line)
    if not m:
        return None
    if m.group("fresh"):
        return 0, int(m.group("fresh")), bool(_UPSTREAM.search(line))
    return int(m.group("start")), int(m.group("total")), bool(_UPSTREAM.search(line))


def duration(seconds: float) -> str:
    """h:mm:ss (hours unbounded)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress lines of one training run, throttled: the first update, then at most one per
    ``interval_s`` seconds, and the last step (``step >= total``) always.

    The rate is measured from a baseline: ``begin(step)`` when training starts (a resumed run: at
    the step it resumed from), else the first update (which then has no rate yet). Elapsed time
    counts from the object's creation (the run's start, model loading included).
    """

    def __init__(self, total: int, interval_s: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.interval_s, self.clock = total, interval_s, clock
        self.created = clock()
        self.base: tuple[int, float] | None = None
        self.shown_at: float | None = None
        self.shown_step: int | None = None

    def begin(self, step: int) -> None:
        self.base = (step, self.clock())

    def update(self, step: int, loss: float | None = None, tokens_per_step: float | None = None,
               samples_per_second: float | None = None, force: bool = False) -> str | None:
        """The line to show for ``step``, or None when it is not due."""
        now = self.clock()
        if self.base is None:
            self.base = (step, now)
        due = (force or self.shown_at is None or step >= self.total
               or now - self.shown_at >= self.interval_s)
        if not due or step == self.shown_step:
            return None
        self.shown_at, self.shown_step = now, step
        return self.line(step, now, loss, tokens_per_step, samples_per_second)

    def line(self, step: int, now: float, loss: float | None = None, tokens_per_step: float | None = None,
             samples_per_second: float | None = None) -> str:
        assert self.base is not None
        done, seconds = step - self.base[0], now - self.base[1]
        steps_per_s = done / seconds if done > 0 and seconds > 0 else None
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if steps_per_s and tokens_per_step:
            parts.append(f"{steps_per_s * tokens_per_step:,.0f} tokens/s")
        elif samples_per_second:
            parts.append(f"{samples_per_second:,.2f} samples/s")
        if steps_per_s:
            parts.append(f"{1 / steps_per_s:.2f} s/step")
        parts.append(f"elapsed {duration(now - self.created)}")
        left = max(0, self.total - step)
        parts.append(f"left {duration(left / steps_per_s)}" if steps_per_s else ("left 0:00:00" if not left
                                                                                  else "left ?"))
        return " | ".join(parts)


def written_at(line: str) -> float | None:
    """The time stamp a log line starts with (local time, as the writer's clock had it), or None."""
    m = _STAMP.match(line)
    if not m:
        return None
    try:
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    except (ValueError, OverflowError):
        return None


class TerminalFilter:
    """What of the sft job's output reaches the terminal (``tee`` gives the log file all of it).

    Upstream's progress is timed by the lines' own time stamps (the launcher relays the worker's
    log in batches every few seconds; the plan line's stamp starts the elapsed time), a line
    without one by when it arrives (``clock``: seconds since the epoch, as the stamps)."""

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.time):
        self.interval_s, self.clock = interval_s, clock
        self.upstream: Progress | None = None  # npu: progress from upstream's Trainer lines
        self._stamp: float | None = None

    def _now(self) -> float:
        return self._stamp if self._stamp is not None else self.clock()

    def feed(self, line: str) -> list[str]:
        text = strip_ansi(line).rstrip("\r\n")
        self._stamp = written_at(text)
        if OUR_LINE.match(text):
            plan = parse_plan(text)
            if plan:
                self.upstream = Progress(plan[1], self.interval_s, self._now) if plan[2] else None
            return [text]
        entry = trainer_entry(text) if self.upstream else None
        if entry and self.upstream:
            shown = self.upstream.update(entry["step"], entry["loss"],
                                         samples_per_second=entry.get("samples_per_second"))
            if shown:
                return [format_line(LOGGER, shown)]
        return []


VARIANT_ENV = "LLAMAPIPE_VARIANT"  # = llamapipe.config.variants.VARIANT_ENV (this module is stdlib only)


def main(stdin: Any = None, stdout: Any = None) -> int:
    """Read the job's output to its end, print what ``TerminalFilter`` keeps. Never stops early:
    ``tee`` writes the log, and a reader gone would cut its pipe and the job with it. Ctrl-C
    reaches the job; this filter ends when the job's output does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout
    keep = TerminalFilter()
    # a variant's sft (its command exports the name): several may train side by side
    label = f"[{os.environ[VARIANT_ENV]}] " if os.environ.get(VARIANT_ENV) else ""
    for raw in iter(source.readline, b""):
        try:
            lines = keep.feed(raw.decode("utf-8", errors="replace"))
            if lines and out is not None:
                out.write("".join(f"{label}{x}\n" for x in lines))
                out.flush()
        except BrokenPipeError:  # nobody reads the terminal any more: keep draining
            out = None
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter's exit flush)
        except Exception:  # noqa: BLE001 (a line we cannot show never stops the job)
            continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
