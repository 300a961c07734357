"""``llamapipe serve`` as a real process on a loopback port, for the serving, chat and README tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"on http://(?P<host>[^\s/]+):(?P<port>\d+)/v1")
LLAMAPIPE = [sys.executable, "-m", "llamapipe"]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    lines: list = field(default_factory=list)  # everything it printed so far

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start(project: Path, *args: str, env: dict | None = None, timeout: float = 120) -> Server:
    """``llamapipe serve --port 0 <args>`` in ``project``; returns once it listens (the port it
    printed), or raises with its output."""
    proc = subprocess.Popen([*LLAMAPIPE, "serve", "--port", "0", *args], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list = []
    found: dict = {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = LISTENING.search(line)
            if m and not found:
                found["url"] = f"http://{m['host']}:{m['port']}"

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while "url" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            time.sleep(0.2)
            raise AssertionError(f"llamapipe serve did not start (exit {proc.poll()}):\n{''.join(lines)}")
        time.sleep(0.05)
    return Server(proc, found["url"], lines)
