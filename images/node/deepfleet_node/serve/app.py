"""The replica's HTTP side: the bearer-token check, the FastAPI app with its two routes,
and uvicorn until SIGTERM."""

from __future__ import annotations

import contextlib
import hmac
import json
import threading
from typing import TYPE_CHECKING

from .request import RequestError, one_line

if TYPE_CHECKING:
    from .replica import Replica

NDJSON = "application/x-ndjson"
# An in-flight stream is cut this long after SIGTERM, rather than holding the exit hostage.
GRACEFUL_S = 5


class RequireToken:
    """ASGI middleware: 401 for any request, on any path, without the shared secret."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            problem = self.problem(dict(scope["headers"]).get(b"authorization"))
            if problem:
                body = json.dumps({"error": problem}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing Authorization: Bearer <token>"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return "wrong token"
        return None


def build_app(replica: Replica, token: str):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequireToken, token=token)

    # Every error body is {"error": "one line"}, never FastAPI's {"detail": ...}.
    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return JSONResponse({"error": one_line(exc)}, 400)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return JSONResponse({"error": f"{type(exc).__name__}: {one_line(exc)}"}, 500)

    async def health(request):
        return JSONResponse(replica.health())

    async def generate(request):
        try:
            job = replica.prepare(await request.body())
        except RequestError as exc:
            return JSONResponse({"error": one_line(exc)}, 400)
        return StreamingResponse(replica.stream(job, request.receive), media_type=NDJSON)

    # Plain request handlers (add_route), not FastAPI's parameter injection: the body is
    # read and checked here so that every shape error is one 400 line, and injection
    # would resolve the annotations this module leaves as strings.
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/generate", generate, methods=["POST"])
    return app


def serve(app, host: str, port: int, on_ready) -> None:
    """uvicorn until SIGTERM or SIGINT; on_ready runs once the socket listens."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version raises the signal again after shutting down, so the
            # process would die of SIGTERM; stopped on request, a replica exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    Server(config).run()
