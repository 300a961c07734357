"""pull_image / build_image: the NPU image, through the docker SDK, with what was used recorded.

The base image is pulled (its digest recorded: the pin a later rebuild must match); the stage
image is built from Dockerfile.npu on top of it with the stack pinned by build args.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError
from llamapipe.core.hashing import sha256_file

log = logging.getLogger("llamapipe.image")


def _client() -> Any:
    from llamapipe.core.docker_engine import connect

    return connect()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def split_reference(image: str) -> tuple:
    """``registry/repo:tag`` -> (``registry/repo``, ``tag``); a port colon is not a tag."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, "latest"
    return name, tag


def pull(image: str, out: str) -> dict:
    import docker

    client = _client()
    repo, tag = split_reference(image)
    log.info("pulling %s", image)
    try:
        for event in client.api.pull(repo, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise PipelineError(f"pull of {image} failed: {event['error']}")
            if event.get("status") and not event.get("progressDetail"):
                log.info("%s %s", event.get("id", ""), event["status"])
        pulled = client.images.get(image)
    except docker.errors.APIError as exc:
        raise PipelineError(f"pull of {image} failed: {exc.explanation or exc}") from None
    record = {"image": image, "id": pulled.id, "digests": pulled.attrs.get("RepoDigests", []), "pulled_at": _now()}
    write_json(out, record)
    log.info("pulled %s: %s", image, record["digests"] or record["id"])
    return record


def build(dockerfile: str, tag: str, build_args: dict, out: str, context: str = ".") -> dict:
    import docker

    client = _client()
    log.info("building %s from %s with %s", tag, dockerfile, json.dumps(build_args, sort_keys=True))
    image_id = None
    try:
        for event in client.api.build(path=context, dockerfile=dockerfile, tag=tag, buildargs=build_args,
                                      rm=True, forcerm=True, decode=True, labels={"llamapipe.image": "npu"}):
            if "error" in event:
                raise PipelineError(f"build of {tag} failed: {event['error'].strip()}")
            if event.get("stream", "").strip():
                log.info("%s", event["stream"].rstrip())
            if "aux" in event and "ID" in event["aux"]:
                image_id = event["aux"]["ID"]
    except docker.errors.APIError as exc:
        raise PipelineError(f"build of {tag} failed: {exc.explanation or exc}") from None
    built = client.images.get(tag)
    record = {"tag": tag, "id": image_id or built.id, "dockerfile": dockerfile,
              "dockerfile_sha256": sha256_file(dockerfile), "build_args": build_args, "built_at": _now()}
    write_json(out, record)
    log.info("built %s (%s)", tag, record["id"])
    return record
