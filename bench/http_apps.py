"""The model servers `bench/http_servers.py` loads: SageMaker's two routes around a small model.

`POST /invocations` parses one CSV line of about 30 floats, takes its dot product with fixed
weights and answers the score as text/csv; `GET /ping` answers 200 (the readiness probe, never
captured). Capture is on when `CAPTURED_BENCH_SOCKET` names the daemon's socket;
`CAPTURED_BENCH_CLIENT` picks how: `thread` (`CaptureClient`, the default) or `async`
(`AsyncCaptureClient`, started and closed by the lifespan handler; FastAPI only), each with
`capture()` called by the route, or `middleware` (`captured.middleware`: `CaptureMiddleware` /
`WSGICaptureMiddleware` around the app, the route untouched).

    cd bench && gunicorn -w 4 --preload -b 127.0.0.1:8080 'http_apps:flask_app()'
    cd bench && uvicorn --factory http_apps:fastapi_app --port 8080
"""

import asyncio
import contextlib
import operator
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from captured import AsyncCaptureClient, CaptureClient

if TYPE_CHECKING:
    from fastapi import FastAPI
    from flask import Flask

SOCKET_ENV = "CAPTURED_BENCH_SOCKET"
CLIENT_ENV = "CAPTURED_BENCH_CLIENT"
CSV = "text/csv"
#: The model: one fixed weight per feature (a request may have fewer features; zip stops there).
WEIGHTS = tuple(((i * 37) % 17 - 8) / 64 for i in range(32))


def score(body: bytes) -> bytes:
    """The "model": a dot product of the request's features with `WEIGHTS`, as CSV."""
    features = [float(x) for x in body.split(b",")]
    return f"{sum(map(operator.mul, features, WEIGHTS)):.10f}\n".encode("ascii")


def flask_app() -> "Flask":
    """The WSGI app. Under `gunicorn --preload` the client is made in the master before the fork;
    each worker then gets a fresh buffer and I/O thread of its own, and flushes at its exit."""
    from flask import Flask, Response, request

    socket_path = os.environ.get(SOCKET_ENV)
    middleware = os.environ.get(CLIENT_ENV) == "middleware"
    client = CaptureClient(socket_path) if socket_path and not middleware else None
    app = Flask("http_apps")
    if socket_path and middleware:
        from captured.middleware import WSGICaptureMiddleware

        app.wsgi_app = WSGICaptureMiddleware(app.wsgi_app, socket_path=socket_path)  # type: ignore[method-assign]

    @app.get("/ping")
    def ping() -> Response:
        return Response(b"", status=200)

    @app.post("/invocations")
    def invocations() -> Response:
        body = request.get_data()
        out = score(body)
        if client is not None:
            client.capture(body, out, request_content_type=CSV, response_content_type=CSV)
        return Response(out, content_type=CSV)

    return app


def fastapi_app() -> "FastAPI":
    """The ASGI app; the client lives from the lifespan's start to its end. (No `from __future__
    import annotations` in this module: FastAPI must resolve the route's `Request` annotation.)"""
    from fastapi import FastAPI, Request, Response

    socket_path = os.environ.get(SOCKET_ENV)
    kind = os.environ.get(CLIENT_ENV, "thread")
    clients: list[Any] = []  # the one client of this arm, if any

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if kind == "middleware":
            pass  # the middleware's own client, closed by the lifespan's shutdown
        elif socket_path and kind == "async":
            aclient = AsyncCaptureClient(socket_path)
            await aclient.start()
            clients.append(aclient)
        elif socket_path:
            clients.append(CaptureClient(socket_path))
        try:
            yield
        finally:
            for client in clients:
                if isinstance(client, AsyncCaptureClient):
                    await client.close()
                else:
                    await asyncio.to_thread(client.close)

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    if socket_path and kind == "middleware":
        from captured.middleware import CaptureMiddleware

        app.add_middleware(CaptureMiddleware, socket_path=socket_path)

    @app.get("/ping")
    async def ping() -> Response:
        return Response(b"", status_code=200)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        body = await request.body()
        out = score(body)
        if clients:
            clients[0].capture(body, out, request_content_type=CSV, response_content_type=CSV)
        return Response(out, media_type=CSV)

    return app
