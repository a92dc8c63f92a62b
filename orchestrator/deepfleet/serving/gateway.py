"""The OpenAI-compatible HTTP API in front of the replicas (FastAPI).

POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not),
GET /v1/models and /health. A bad request gets OpenAI's error shape with a 4xx code; the
replicas' own refusals (a prompt longer than the model's context) pass through the same way.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfleet.planning.serveplan import MAX_TOKENS_LIMIT
from deepfleet.serving.pool import NoReplica, Piece, Pool, ReplicaError


@dataclass(frozen=True)
class GatewaySettings:
    model_id: str
    api_key: str | None = None
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    default_max_tokens: int = 16


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def error_body(message: str, kind: str, code: str | None = None, param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(exc: BadRequest) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}
    return JSONResponse(
        error_body(str(exc), kind.get(exc.status, "invalid_request_error"), exc.code, exc.param),
        status_code=exc.status,
    )


# ---------------------------------------------------------------- request checks


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"{key} must be a number from {low} to {high}", param=key)
    return float(value)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 strings", param="stop")
    return [s for s in stops if s]


def generation_body(body: dict, settings: GatewaySettings, chat: bool) -> dict:
    """The replica's request from an OpenAI one: checked here, so a replica only ever
    sees what it can run."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required", param="model")
    if model != settings.model_id:
        raise BadRequest(
            f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
            404, "model_not_found", "model",
        )  # fmt: skip
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(key, settings.default_max_tokens)
    if max_tokens is None:
        max_tokens = settings.default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"{key} must be a positive integer", param=key)
    if max_tokens > settings.max_tokens_limit:
        raise BadRequest(
            f"{key} is {max_tokens}, over this server's limit of {settings.max_tokens_limit}",
            param=key,
        )
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("n must be 1 (one choice per request)", param="n")
    out: dict = {"max_tokens": max_tokens, "stop": _stops(body)}
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if temperature:  # 0 or absent: greedy, as OpenAI's temperature 0 is close to
        out["temperature"] = temperature
        if top_p is not None:
            out["top_p"] = top_p
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest("seed must be an integer", param="seed")
        out["seed"] = seed
    if chat:
        out["messages"] = _messages(body.get("messages"))
    else:
        out["prompt"] = _prompt(body.get("prompt"))
    return out


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] needs a role", param=f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(
                    f"messages[{index}]: only text content is supported",
                    param=f"messages[{index}].content",
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(
                f"messages[{index}].content must be a string", param=f"messages[{index}]"
            )
        plain.append({"role": message["role"], "content": content})
    return plain


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (one prompt per request)", param="prompt")
    if not prompt:
        raise BadRequest("prompt is empty", param="prompt")
    return prompt


# ---------------------------------------------------------------- responses


def _usage(done: dict) -> dict:
    prompt, completion = int(done.get("prompt_tokens", 0)), int(done.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Exchange:
    """One request's response, in OpenAI's completion or chat shape."""

    def __init__(self, model: str, chat: bool):
        self.model = model
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, done: dict) -> dict:
        reason = done.get("finish_reason", "stop")
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {**self._head(False), "choices": [choice], "usage": _usage(done)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, done: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": _usage(done)}


def _sse(item: dict | str) -> bytes:
    data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---------------------------------------------------------------- the app


def make_app(pool: Pool, settings: GatewaySettings) -> FastAPI:
    app = FastAPI(title="deepfleet", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(BadRequest("the request does not have the expected fields"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code
        )

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if settings.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key, settings.api_key):
                return _error(
                    BadRequest("a valid API key is required (Authorization: Bearer KEY)",
                               401, "invalid_api_key")
                )  # fmt: skip
        return await call_next(request)

    @app.get("/health")
    async def health():
        ready = len(pool.ready())
        body = {"status": "ok" if ready else "unavailable", "model": settings.model_id,
                "replicas": [r.to_dict() for r in pool.replicas]}  # fmt: skip
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": 0,
                      "owned_by": "deepfleet"}],
        }  # fmt: skip

    async def answer(request: Request, chat: bool):
        body = await _json(request)
        replica_body = generation_body(body, settings, chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false", param="stream")
        exchange = Exchange(settings.model_id, chat)
        pieces = pool.generate(replica_body)
        if not stream:
            text, done = "", {}
            try:
                async for piece in pieces:
                    if piece.done is not None:
                        done = piece.done
                    text += piece.text
            except (ReplicaError, NoReplica) as exc:
                raise _refusal(exc) from None
            return exchange.whole(text, done)
        options = body.get("stream_options") or {}
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        # the first piece is awaited here, so a refusal is still an HTTP error, not an event
        first = await _first(pieces)
        return StreamingResponse(
            _events(exchange, first, pieces, usage), media_type="text/event-stream"
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


def _refusal(exc: Exception) -> BadRequest:
    if isinstance(exc, ReplicaError):
        return BadRequest(str(exc), exc.status if 400 <= exc.status < 500 else 400)
    return BadRequest(str(exc), 503, "no_replica")


async def _first(pieces: AsyncIterator[Piece]) -> Piece:
    try:
        return await pieces.__anext__()
    except (ReplicaError, NoReplica) as exc:
        raise _refusal(exc) from None
    except StopAsyncIteration:
        raise _refusal(NoReplica("the replica ended the answer without a result")) from None


async def _events(
    exchange: Exchange, first: Piece, pieces: AsyncIterator[Piece], usage: bool
) -> AsyncIterator[bytes]:
    if exchange.chat:
        yield _sse(exchange.chunk(None, first=True))
    piece = first
    try:
        while True:
            if piece.done is not None:
                yield _sse(exchange.chunk(None, piece.done.get("finish_reason", "stop")))
                if usage:
                    yield _sse(exchange.usage_chunk(piece.done))
                break
            if piece.text:
                yield _sse(exchange.chunk(piece.text))
            piece = await pieces.__anext__()
    except (ReplicaError, NoReplica) as exc:  # mid-stream: the error is the last event
        yield _sse(error_body(str(exc), "server_error", "no_replica"))
    except StopAsyncIteration:
        pass
    yield _sse("[DONE]")
