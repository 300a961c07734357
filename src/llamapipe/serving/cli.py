"""``llamapipe serve`` and ``llamapipe chat``: the config read as the workflow reads it, then the
server started where the target runs its stages (in this process on target cpu; on target npu in
the stage image on the predict rule's cards, ``llamapipe.npu.serve_script``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import Any

from llamapipe.core.errors import PipelineError

log = logging.getLogger("llamapipe.serve")


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", action="append", default=[], metavar="FILE",
                   help="a YAML config merged over config.yaml, as snakemake --configfile")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config values, as snakemake --config (e.g. serve={port: 8001} target=npu)")
    p.add_argument("--inference", default=None,
                   help="the exported model directory (default: the run's results/inference)")


def add_serving_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the run's exported model")
    _config_arguments(p)
    p.add_argument("--host", default=None, help="address to bind (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (serve.port, default 8000; 0: a free one)")
    p.add_argument("--api-key-env", default="LLAMAPIPE_API_KEY",
                   help="environment variable with the bearer token clients must send (unset: none)")
    p.add_argument("--allow-no-key", action="store_true",
                   help="bind an address other than loopback without a token (a trusted network only)")
    p.add_argument("--dry-run", action="store_true", help="print the command that would serve, do not run it")
    p.set_defaults(handler=_serve, threads=1)

    c = sub.add_parser("chat", help="talk to the fine-tuned model in the terminal")
    _config_arguments(c)
    c.add_argument("--url", default=None,
                   help="a running `llamapipe serve` (e.g. http://127.0.0.1:8000); needed on target npu")
    c.add_argument("--api-key-env", default="LLAMAPIPE_API_KEY", help="environment variable with the bearer token")
    c.add_argument("--max-tokens", type=int, default=None, help="longest answer (default predict.max_new_tokens)")
    c.set_defaults(handler=_chat, threads=1)


def load_config(a: argparse.Namespace) -> dict[str, Any]:
    from llamapipe.config import load

    if not os.path.isfile("config.yaml"):
        raise PipelineError(f"no config.yaml in {os.getcwd()}: run llamapipe serve/chat in the project directory")
    return load("config.yaml", overrides=a.config, configfiles=a.configfile)


def model_name(cfg: dict[str, Any]) -> str:
    if cfg["serve"]["model_name"]:
        return cfg["serve"]["model_name"]
    base = "tiny-llama" if cfg["target"] == "cpu" or cfg.get("rehearsal") else cfg["npu"]["model_name_or_path"]
    return os.path.basename(str(base).rstrip("/")) + "-sft"


def inference_dir(a: argparse.Namespace) -> str:
    from llamapipe.config.paths import PATHS

    return a.inference or PATHS["inference"]


def server_argv(a: argparse.Namespace, cfg: dict[str, Any]) -> list[str]:
    """The server's own flags (``python -m llamapipe.serving.server``), engine and model aside."""
    from llamapipe.config.stage_params import stage_params

    settings = dict(cfg["serve"])
    if a.host is not None:
        settings["host"] = a.host
    if a.port is not None:
        settings["port"] = a.port
    predict = stage_params("predict", cfg)
    argv = ["--serve", json.dumps(settings, sort_keys=True), "--predict", json.dumps(predict, sort_keys=True),
            "--model-name", model_name(cfg), "--threads", str(predict.get("threads") or cfg["threads"]),
            "--api-key-env", a.api_key_env]
    return argv + (["--allow-no-key"] if a.allow_no_key else [])


def _serve(a: argparse.Namespace) -> Any:
    cfg = load_config(a)
    argv = server_argv(a, cfg)
    if cfg["target"] == "npu":
        from llamapipe.npu.serve_script import serve_command

        if a.inference:
            raise PipelineError("--inference: on target npu the server reads the run's results/inference, "
                                "where the predict rule's predictor reads it (inside the stage image)")

        command = serve_command(cfg, os.getcwd(), argv)
        if a.dry_run:
            print(command)
            return {"command": command}
        log.info("serving in %s: %s", "this host's CPU (rehearsal)" if cfg.get("rehearsal") else "the stage image",
                 command)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp("bash", ["bash", "-c", command])  # signals reach the server, its exit code is ours
    from llamapipe.serving import server

    argv = ["--engine", "local", "--inference", inference_dir(a), *argv]
    if a.dry_run:
        command = shlex.join(["python", "-m", "llamapipe.serving.server", *argv])
        print(command)
        return {"command": command}
    return {"exit": server.run(server.build_parser().parse_args(argv))}


def _chat(a: argparse.Namespace) -> Any:
    from llamapipe.serving.chat import run_chat

    key = os.environ.get(a.api_key_env) or None
    if a.url:
        sys.exit(run_chat(url=a.url, api_key=key, max_tokens=a.max_tokens))
    cfg = load_config(a)
    if cfg["target"] == "npu":
        raise PipelineError("on target npu the model runs in the stage image on the cards: start `llamapipe serve "
                            "--config target=npu` and chat with it: `llamapipe chat --url http://127.0.0.1:"
                            f"{cfg['serve']['port']}`")
    from llamapipe.config.stage_params import stage_params
    from llamapipe.serving.engine import LocalEngine

    directory = inference_dir(a)
    if not os.path.isfile(os.path.join(directory, "export_config.json")):
        raise PipelineError(f"{directory} holds no exported model (no export_config.json): run `make run` first")
    predict = stage_params("predict", cfg)
    engine = LocalEngine(directory, predict, threads=predict.get("threads") or cfg["threads"],
                         model_name=model_name(cfg))
    sys.exit(run_chat(engine=engine, max_tokens=a.max_tokens))
