"""Logging set-up shared by every entry point."""

from __future__ import annotations

import logging
import re
import sys

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A line our own loggers wrote (LINE_FORMAT under the ``llamapipe`` logger): what the sft rule
# shows on the terminal of everything its job prints (``llamapipe.stages.progress``).
OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) llamapipe[\w.]*: ")
# Terminal escape sequences (colours, cursor moves): never in a log file
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def format_line(name: str, message: str, level: int = logging.INFO) -> str:
    """``message`` as our logger ``name`` would print it (for lines made outside a logger call)."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    return logging.Formatter(LINE_FORMAT).format(record)


def configure_logging() -> logging.Logger:
    """Our own handler on the ``llamapipe`` logger: importing paddle lowers the root logger to
    WARNING, which would silence every stage's progress lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    root = logging.getLogger("llamapipe")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    return root
