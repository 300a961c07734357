"""Logging set-up shared by every entry point."""

from __future__ import annotations

import logging
import sys


def configure_logging() -> logging.Logger:
    """Our own handler on the ``llamapipe`` logger: importing paddle lowers the root logger to
    WARNING, which would silence every stage's progress lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("llamapipe")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    return root
