"""Our code as script paths: what ``paddle.distributed.launch`` can start (it takes a script, not
``-m``), relative to the directory that holds the package (mounted into containers as is)."""

from __future__ import annotations

import os

CLI_SCRIPT = os.path.join("llamapipe", "entrypoints", "cli_script.py")  # the CLI (sft under the launcher)
CPU_SHIMS_SCRIPT = os.path.join("llamapipe", "entrypoints", "cpu_shims_script.py")  # upstream scripts on CPU
SMOKE_SCRIPT = os.path.join("llamapipe", "stages", "smoke_collective.py")  # the collective smoke test
SERVE_SCRIPT = os.path.join("llamapipe", "entrypoints", "serve_script.py")  # the server under the CPU shims


def package_src_dir() -> str:
    """The directory that holds this package: stage code runs from it inside containers."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
