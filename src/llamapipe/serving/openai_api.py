"""OpenAI's completions and chat-completions API over the engine, as a FastAPI app.

Greedy (as the export decodes): ``temperature``/``top_p`` are accepted and do not change the
tokens; ``n`` must be 1. Every refusal is OpenAI's error shape with a message that names the
limit and the key that sets it; the app answers the next request after any of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from llamapipe.serving.batcher import Batcher, QueueFull
from llamapipe.serving.engine import Completion, Engine, prompt_of_messages

log = logging.getLogger("llamapipe.serve")

Stop = Union[StrictStr, list[StrictStr], None]


class _Request(BaseModel):
    # clients send fields we do not use (user, logprobs, seed...): accepted, not errors
    model_config = ConfigDict(extra="allow")
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    stop: Stop = None
    stream: StrictBool = False
    n: StrictInt = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictStr]]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    where = _field(first["loc"])
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return ApiError(400, f"{where}: {first['msg']}{more}", param=where, code="invalid_value")


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (not included), and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def settled_prefix(text: str, stops: list[str]) -> str:
    """What of a partly decoded text can be sent already. The tokenizer's clean-up rewrites a
    space followed by punctuation or a contraction (" ." -> ".", " n't" -> "n't": patterns of at
    most 4 characters), so a space among the last 4 may still go; an unfinished character shows
    as U+FFFD; and a stop string may be starting at the end."""
    space = text.find(" ", max(len(text) - 4, 0))
    settled = text[:space] if space >= 0 else text
    settled = settled.split("\ufffd", 1)[0]
    hold = max((len(s) for s in stops), default=1) - 1
    return settled[: max(len(settled) - hold, 0)] if hold else settled


class Api:
    def __init__(self, engine: Engine, batcher: Batcher, settings: dict[str, Any], api_key: Optional[str] = None):
        self.engine, self.batcher, self.settings, self.api_key = engine, batcher, settings, api_key
        self.started = time.time()
        self.served = 0
        self.in_flight = 0  # accepted, not yet decoded

    # -- request reading ------------------------------------------------------------------
    async def read_json(self, request: Any) -> Any:
        cap = int(self.settings["max_body_bytes"])
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise self._too_large(int(declared), cap)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise self._too_large(len(body), cap)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(400, f"the request body is not UTF-8 (byte {err.start})", code="invalid_encoding") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None

    @staticmethod
    def _too_large(size: int, cap: int) -> ApiError:
        return ApiError(413, f"the request body is {size} bytes or more; the limit is {cap} (serve.max_body_bytes)",
                        code="body_too_large")

    def check_auth(self, request: Any) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def parse(self, model: Any, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_value")
        try:
            req = model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        if req.n != 1:
            raise ApiError(400, f"n={req.n}: decoding is greedy, so n must be 1", param="n", code="invalid_value")
        if req.model is not None and req.model != self.engine.info.model:
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {self.engine.info.model!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        return req

    def budget(self, prompt: str, max_tokens: Optional[int]) -> tuple[int, int]:
        """(tokens to decode, the prompt's tokens), or the refusal naming the limit's key."""
        limits = self.engine.info.limits
        n = max_tokens or limits.default_max_tokens or limits.max_new_tokens
        if n > limits.max_new_tokens:
            raise ApiError(400, f"max_tokens={n} is more than the {limits.max_new_tokens} tokens this server "
                           f"decodes at most ({limits.max_new_tokens_key}; {limits.max_new_tokens_fix})",
                           param="max_tokens", code="max_tokens_exceeded")
        tokens = self.engine.prompt_tokens(prompt)
        if tokens > limits.src_length:
            raise ApiError(400, f"the prompt is {tokens} tokens; the exported model takes at most "
                           f"{limits.src_length} ({limits.src_length_key}, then rerun sft and export)",
                           param="prompt", code="context_length_exceeded")
        return n, tokens

    def submit(self, prompt: str, budget: tuple[int, int], stream: bool) -> Any:
        try:
            pending = self.batcher.submit(prompt, budget[0], stream=stream, prompt_tokens=budget[1])
        except QueueFull as err:
            raise ApiError(503, str(err), kind="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.in_flight += 1
        pending.result.add_done_callback(self._answered)
        return pending

    def _answered(self, _: Any) -> None:
        self.in_flight -= 1

    # -- responses ------------------------------------------------------------------------
    def header(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.engine.info.model}

    @staticmethod
    async def answer(pending: Any) -> Completion:
        try:
            return await pending.result
        except Exception as exc:  # the batch failed (the decoding thread logged it); the server lives on
            raise ApiError(500, f"decoding failed: {type(exc).__name__}: {exc}", kind="server_error",
                           code="decoding_failed") from None

    @staticmethod
    def finished(done: Completion, stops: list[str]) -> tuple[str, str]:
        text, stopped = cut_at_stop(done.text, stops)
        return text, "stop" if stopped else done.finish_reason

    @staticmethod
    def usage(done: list[Completion]) -> dict[str, int]:
        p, c = sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(self, pending: Any, stops: list[str], chunk: Any) -> AsyncIterator[str]:
        """Server-sent events: text as it settles, the rest and the finish reason at the end."""
        sent = ""
        yield _sse(chunk("", None, first=True))
        while True:
            text = await pending.stream.get()
            if text is None:
                break
            cut, stopped = cut_at_stop(text, stops)
            ready = cut if stopped else settled_prefix(text, stops)
            if len(ready) > len(sent) and ready.startswith(sent):
                yield _sse(chunk(ready[len(sent):], None))
                sent = ready
        try:
            done = await self.answer(pending)
        except ApiError as err:  # the batch failed: the client gets an error event, the server lives on
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
            return
        text, reason = self.finished(done, stops)
        if not text.startswith(sent):  # cannot happen with settled_prefix; say so if it does
            log.warning("streamed text %r is not a prefix of the final %r", sent, text)
        yield _sse(chunk(text[len(sent):], reason))
        yield "data: [DONE]\n\n"
        self.served += 1


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stops(stop: Stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def create_app(api: Api) -> FastAPI:
    app = FastAPI(title="llamapipe", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        err = ApiError(500, f"the server failed on this request: {type(exc).__name__}: {exc} (its log has the "
                       "traceback); it keeps serving", kind="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        err = ApiError(400, f"{_field(first['loc'])}: {first['msg']}", param=_field(first["loc"]))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Any) -> JSONResponse:
        err = ApiError(404, f"no route {request.method} {request.url.path}; the routes are /v1/completions, "
                       "/v1/chat/completions, /v1/models, /health", code="not_found")
        return JSONResponse(err.body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Any) -> JSONResponse:
        err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return JSONResponse(err.body(), status_code=405)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = api.engine.info
        return {"status": "ok", "model": info.model, "in_flight": api.in_flight, "queued": api.batcher.queued(),
                "decoding": api.batcher.busy,
                "served": api.served, "uptime_s": round(time.time() - api.started, 1),
                "batch_sizes": {str(k): v for k, v in sorted(api.batcher.batch_sizes.items())},
                "rows_per_step": {str(k): v for k, v in sorted(api.batcher.rows_per_step.items())},
                "limits": {"src_length": info.limits.src_length, "max_new_tokens": info.limits.max_new_tokens,
                           "max_batch_size": api.batcher.max_batch, "max_queue": api.batcher.max_queue},
                **info.details}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        api.check_auth(request)
        return {"object": "list", "data": [{"id": api.engine.info.model, "object": "model",
                                            "created": int(api.started), "owned_by": "llamapipe"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        api.check_auth(request)
        req = api.parse(CompletionRequest, await api.read_json(request))
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ApiError(400, "prompt: an empty list", param="prompt", code="invalid_value")
        if req.stream and len(prompts) > 1:
            raise ApiError(400, "stream with a list of prompts: send one prompt per streamed request",
                           param="prompt", code="invalid_value")
        budgets = [api.budget(p, req.max_tokens) for p in prompts]
        stops, head = _stops(req.stop), api.header("text")
        pendings = [api.submit(p, b, req.stream) for p, b in zip(prompts, budgets)]
        if req.stream:
            def chunk(text: str, reason: Optional[str], first: bool = False) -> dict[str, Any]:
                return {**head, "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
            return StreamingResponse(api.stream(pendings[0], stops, chunk), media_type="text/event-stream")
        done = await asyncio.gather(*[api.answer(p) for p in pendings])
        choices = []
        for i, d in enumerate(done):
            text, reason = api.finished(d, stops)
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        api.served += 1
        return JSONResponse({**head, "object": "text_completion", "choices": choices, "usage": api.usage(done)},
                            headers={"X-Batch-Size": ",".join(str(p.batch_size) for p in pendings)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        api.check_auth(request)
        req = api.parse(ChatRequest, await api.read_json(request))
        # sft trained on bare sources: no system prompt in its template, so system turns are left out
        turns = [m.content for m in req.messages if m.role != "system"]
        if not turns:
            raise ApiError(400, "messages: no user or assistant message", param="messages", code="invalid_value")
        prompt = prompt_of_messages(turns)
        try:
            budget = api.budget(prompt, req.max_completion_tokens or req.max_tokens)
        except ApiError as err:
            err.param = "messages" if err.code == "context_length_exceeded" else err.param
            raise
        stops, head = _stops(req.stop), api.header("chat")
        pending = api.submit(prompt, budget, req.stream)
        if req.stream:
            def chunk(text: str, reason: Optional[str], first: bool = False) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            return StreamingResponse(api.stream(pending, stops, chunk), media_type="text/event-stream")
        done = await api.answer(pending)
        text, reason = api.finished(done, stops)
        api.served += 1
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": reason}],
                             "usage": api.usage([done])},
                            headers={"X-Batch-Size": str(pending.batch_size)})

    return app
