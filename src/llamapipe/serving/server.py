"""The serving process: an engine, the batcher, the OpenAI-shaped app, uvicorn.

    python -m llamapipe.serving.server --engine local --inference results/inference \\
        --predict '{...predict section...}' --serve '{...serve section...}'
    python -m llamapipe.serving.server --engine upstream --predict ... --serve ... -- <predictor.py flags>

``llamapipe serve`` builds this call from the config (in-process on target cpu; in the stage
image on the cards on target npu). SIGTERM (and Ctrl-C): no new connections, the requests in
flight and those queued are answered (up to ``serve.graceful_shutdown_s``), exit 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from llamapipe.core.errors import PipelineError

log = logging.getLogger("llamapipe.serve")

API_KEY_ENV = "LLAMAPIPE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llamapipe.serving.server", description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=["local", "upstream"], default="local",
                   help="local: the predict stage's static-graph decoder (target cpu); upstream: PaddleNLP's "
                        "predictor with the predict rule's flags (target npu), given after --")
    p.add_argument("--inference", help="the exported model directory (engine local)")
    p.add_argument("--predict", type=json.loads, default={}, help="the config's predict section as JSON")
    p.add_argument("--serve", type=json.loads, default={}, help="the config's serve section as JSON")
    p.add_argument("--model-name", default=None, help="id in /v1/models")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the engine (predict.threads)")
    p.add_argument("--api-key-env", default=API_KEY_ENV,
                   help=f"environment variable holding the bearer token clients must send (default {API_KEY_ENV}; "
                        "unset or empty: no token)")
    p.add_argument("--allow-no-key", action="store_true",
                   help="bind an address other than loopback without an API key (a trusted network only)")
    p.add_argument("predictor_argv", nargs="*", help="engine upstream: predictor.py's flags (after --)")
    return p


def serve_settings(given: dict[str, Any]) -> dict[str, Any]:
    """The serve section: ``given`` (``llamapipe serve`` passes the whole resolved section), any
    key it lacks from the schema's defaults (a partial --serve, as the bench and tests pass)."""
    given = {k: v for k, v in given.items() if v is not None or k == "model_name"}
    from llamapipe.config.validation import config_schema

    try:
        section = config_schema()["properties"]["serve"]["properties"]
    except FileNotFoundError:  # the package without its checkout (a stage image): the caller gives it all
        lacking = sorted({"host", "port", "max_batch_size", "batch_window_ms", "max_queue", "max_body_bytes",
                          "graceful_shutdown_s"} - set(given))
        if lacking:
            raise PipelineError(f"--serve lacks {', '.join(lacking)} and this install has no config schema to "
                                "take their defaults from: pass the whole serve section") from None
        return given
    missing = {k: v["default"] for k, v in section.items() if k not in given}
    return {**missing, **given}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from(env_name: str, host: str, allow_no_key: bool) -> str | None:
    key = os.environ.get(env_name) or None
    if key is None and not is_loopback(host) and not allow_no_key:
        raise PipelineError(f"serve.host={host} is reachable from other machines: set a bearer token in "
                            f"${env_name} (clients send 'Authorization: Bearer <token>'), or pass --allow-no-key "
                            "on a trusted network")
    return key


def make_engine(a: argparse.Namespace) -> Any:
    if a.engine == "upstream":
        from llamapipe.serving.upstream_engine import UpstreamEngine

        return UpstreamEngine(list(a.predictor_argv), a.predict, a.model_name or "llamapipe")
    if not a.inference:
        raise PipelineError("--inference: the exported model directory is needed for --engine local")
    if not os.path.isfile(os.path.join(a.inference, "export_config.json")):
        raise PipelineError(f"{a.inference} holds no exported model (no export_config.json): run "
                            "`snakemake --cores 2 results/predictions.json` (or `make run`) first")
    from llamapipe.serving.engine import LocalEngine

    return LocalEngine(a.inference, a.predict, threads=a.threads, model_name=a.model_name)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that name it; without it every response
    # after the first on a kept-alive connection waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PipelineError(f"cannot listen on {host}:{port}: {err.strerror} (serve.port / --port sets the port; "
                            "0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(a: argparse.Namespace) -> int:
    import uvicorn

    from llamapipe.serving.batcher import Batcher
    from llamapipe.serving.openai_api import Api, create_app

    settings = serve_settings(a.serve)
    key = api_key_from(a.api_key_env, settings["host"], a.allow_no_key)
    sock = bind(settings["host"], int(settings["port"]))  # before the model loads: a taken port fails fast
    engine = make_engine(a)
    batcher = Batcher(engine, int(settings["max_batch_size"]), float(settings["batch_window_ms"]) / 1000,
                      int(settings["max_queue"]))
    batcher.start()
    api = Api(engine, batcher, settings, api_key=key)
    app = create_app(api)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d/v1 (batches of up to %d within %s ms, queue %d, token %s); "
             "SIGTERM or Ctrl-C stops it", engine.info.model, shown, port, batcher.max_batch,
             settings["batch_window_ms"], batcher.max_queue, "required" if key else "not required")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=settings["graceful_shutdown_s"],
                            lifespan="off")
    server = uvicorn.Server(config)
    received: list[int] = []
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the handler
    # it found: this one only records it, so a requested stop ends with exit code 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        batcher.stop(timeout=settings["graceful_shutdown_s"])
    why = f"on {signal.Signals(received[0]).name}" if received else ""
    log.info("stopped %s after answering %d requests (batch sizes %s)", why, api.served,
             dict(sorted(batcher.batch_sizes.items())))
    return 0


def main(argv: list[str] | None = None) -> None:
    from llamapipe.core.logs import configure_logging
    from llamapipe.core.paddle_env import prepare

    a = build_parser().parse_args(argv)
    configure_logging()
    prepare(a.threads)
    try:
        code = run(a)
    except PipelineError as err:
        log.error("serve failed: %s", err)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
