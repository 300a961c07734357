"""The Docker engine, reached through the docker SDK (``DOCKER_HOST`` honoured): one place that
connects and names the engine in errors, for the container runner, the image stages and preflight.
Python 3.9 compatible; the SDK is imported lazily."""

from __future__ import annotations

import os
from typing import Any

from llamapipe.core.errors import PipelineError

# seconds for one engine API call (log streaming and wait() have none); generous: creating a
# container copies the image on some storage drivers (vfs)
CLIENT_TIMEOUT = 600


def engine_name() -> str:
    host = os.environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={host}" if host else "unix:///var/run/docker.sock (DOCKER_HOST is unset)"


def connect(timeout: float = CLIENT_TIMEOUT) -> Any:
    """``docker.from_env()``, checked with a ping; an unreachable engine is a PipelineError."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - the host venv has it
        raise PipelineError("the docker SDK is not installed in this environment (pip install docker)") from exc
    import requests

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        raise PipelineError(f"cannot reach the Docker engine at {engine_name()}: {exc}. "
                            "Start dockerd, or set DOCKER_HOST to a running engine") from exc
    return client
