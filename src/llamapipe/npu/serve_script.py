"""``llamapipe serve`` on target npu: the command that starts our server over upstream's predictor.

What runs where (``serve_command``):
- the host runs ``llamapipe container-run`` (the docker SDK runner), exactly as it runs the
  predict rule: the predict rule's container spec (``runners.commands.container_spec("predict")``:
  the stage image, ``ASCEND_RT_VISIBLE_DEVICES`` and the ``/dev/davinci*`` nodes of predict's one
  card, the driver mounts, the project mounted at its own path, ``npu.network``), with the
  container labelled ``serve-<port>`` instead of ``predict``;
- inside it, predict's ``bash -c`` script (``npu.scripts.serve_script``: Ascend and ATB env, the
  ops wheel, the checkout's ``llm/``), whose last step ``exec``s
  ``python -m llamapipe.serving.server --engine upstream <serve_argv> -- <predictor flags>``: our
  FastAPI/uvicorn server and batcher, decoding with upstream's own ``create_predictor`` and
  ``predict()`` (``llamapipe.serving.upstream_engine``) built from the predict rule's predictor.py
  flags (``upstream_args.serving_predictor_args``: ``--inference_model --block_attn`` on the
  cards, the same dtype, lengths and batch size, ``--mode static``), on ``results/inference``;
- the rehearsal (``rehearsal: cpu``, runtime local): the same script as a local process, the
  server started through ``llamapipe.npu.cpu_shims`` with predict's shims (as a script path,
  ``entrypoints/serve_script.py``), no Ascend env, ``--device cpu``, no ``--inference_model``.

The port: the server binds ``serve.host:serve.port`` inside the container. The container runner
publishes no ports, so the container must share the host's network: ``npu.network: host`` (the
guide's setting and the default). Any other network is refused with an error naming the key (the
rehearsal in a container takes ``container.network``), rather than starting a server nobody can
reach.

Stopping: ``container-run`` answers SIGTERM/SIGINT with ``docker stop`` (SIGTERM to the
container's PID 1, which the ``exec`` makes the server itself), waits, then SIGKILLs and removes
the container. Its wait is set to ``2 * serve.graceful_shutdown_s + 10`` s: uvicorn gives the
requests in flight up to ``graceful_shutdown_s``, the batcher then finishes the batch it decodes
(again up to ``graceful_shutdown_s``), then Paddle tears down. A container left by a killed
``llamapipe serve`` (SIGKILL to the host process) keeps its card until the next ``serve`` on the
same port removes it (label ``serve-<port>``; two servers on one port cannot both listen on the
host network anyway).

No Paddle imports: this runs on the host.
"""

from __future__ import annotations

import json
import os

from llamapipe.config.paths import PATHS
from llamapipe.core.errors import PipelineError
from llamapipe.npu import scripts
from llamapipe.runners.commands import placed_like

PLACED_AS = "predict"  # the rule whose placement (image, cards, nodes, mounts, env) serve takes
STOP_MARGIN_S = 10.0  # after both graceful waits: the process's own exit (Paddle's teardown)


def _serve_settings(cfg: dict, serve_argv: list[str]) -> dict:
    """The serve section the server will read: ``--serve JSON`` in ``serve_argv`` over ``cfg['serve']``."""
    settings = dict(cfg.get("serve") or {})
    for i, arg in enumerate(serve_argv):
        text = serve_argv[i + 1] if arg == "--serve" and i + 1 < len(serve_argv) else (
            arg[len("--serve="):] if arg.startswith("--serve=") else None)
        if text is not None:
            try:
                settings.update({k: v for k, v in json.loads(text).items() if v is not None})
            except (ValueError, AttributeError) as err:
                raise PipelineError(f"--serve must be a JSON object, got {text!r}: {err}") from None
    return settings


def container_label(port: int) -> str:
    return f"serve-{port}"


def stop_timeout(graceful_shutdown_s: float) -> float:
    return 2 * float(graceful_shutdown_s) + STOP_MARGIN_S


def _with_serve(serve_argv: list[str], settings: dict) -> list[str]:
    """``serve_argv`` with its ``--serve`` (or a new one) set to ``settings``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(serve_argv):
        if skip:
            skip = False
            continue
        if arg == "--serve" and i + 1 < len(serve_argv):
            skip = True
            continue
        if not arg.startswith("--serve="):
            out.append(arg)
    return ["--serve", json.dumps(settings, sort_keys=True), *out]


def serve_command(cfg: dict, project_dir: str, serve_argv: list[str]) -> str:
    """The whole shell command that serves ``results/inference`` on target npu (see the module
    docstring); ``serve_argv``: the server's own flags (``--serve JSON --predict JSON --model-name
    NAME ...``). Run it so that signals reach it (``exec``, not a shell that stays around)."""
    if cfg["target"] != "npu":
        raise PipelineError("serve_command is the npu target's; target cpu serves in-process (--engine local)")
    project = os.path.abspath(project_dir)
    settings = _serve_settings(cfg, list(serve_argv))
    threads = cfg["predict"]["threads"] or cfg["threads"]  # what the predict rule gives its container
    if cfg["runtime"] != "local" and cfg["npu"]["network"] != "host":
        key = "container.network" if cfg.get("rehearsal") else "npu.network"
        raise PipelineError(
            f"serve on target npu runs in the stage image, whose network is {key}={cfg['npu']['network']}: the "
            f"server's port {settings.get('port', 8000)} would not be reachable from this host (the container "
            f"runner publishes no ports); set {key}: host (as the NPU guide runs its containers)")
    # the whole serve section into the script: in the stage image the server has no schema to fill a
    # partial --serve from
    argv = scripts.serve_script(cfg, PATHS, project, _with_serve(list(serve_argv), settings))
    # stopped_exit: the server drains on SIGTERM and exits 0; that is serve's exit code too
    return placed_like(PLACED_AS, cfg, project, argv, threads, label=container_label(int(settings.get("port", 8000))),
                       stop_timeout=stop_timeout(settings.get("graceful_shutdown_s", 60)),
                       stopped_exit="container")
