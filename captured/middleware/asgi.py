"""ASGI 3 capture middleware: every model request captured, one line in the app.

    app.add_middleware(CaptureMiddleware, socket_path="/run/captured/capture.sock")  # Starlette, FastAPI
    app = CaptureMiddleware(app, socket_path="/run/captured/capture.sock")          # any ASGI app

How one exchange is captured (`http` scopes that `common.Policy` lets through; every other
scope and request passes with nothing wrapped):

- `receive` is wrapped: each `http.request` message reaches the app unchanged, and its body is
  copied (up to `max_body_bytes`, `common.BodyCopy`) as it passes, however the app reads it (in
  pieces, or not at all: then the capture holds what it read). An `http.disconnect` is noted.
- `send` is wrapped: `http.response.start` gives the status and `Content-Type`; each
  `http.response.body` goes on at once, unchanged (no buffering of the response: a streamed
  response, server-sent events of an LLM server, reaches the client chunk by chunk as without
  the middleware), and is copied. Headers, trailers, status and Content-Length are untouched.
- When the app returns with its response complete, the exchange goes to the client
  (`common.submit`: bodies, content types, SageMaker's inference id and custom attributes
  headers); a status >= 400 only with `capture_errors`, a body over the limit never. A client
  that went away before the response ended yields no capture (`disconnected`); an app that
  raises yields none (`app_error`) and its exception propagates as without the middleware.

The client: `client=` (a `CaptureClient` or `AsyncCaptureClient`, not closed by the middleware),
or one of its own, an `AsyncCaptureClient` made on the server's event loop at the first captured
request and flushed and closed at the lifespan's shutdown. Servers run one loop per process; a
test harness that runs each request on a loop of its own (Starlette's `TestClient` outside a
`with` block) gets a new client per loop, with a warning: use `with TestClient(app)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Unpack

from captured.client.aio import AsyncCaptureClient
from captured.middleware.common import (
    APP_ERROR,
    CUSTOM_ATTRIBUTES_HEADER,
    DISCONNECTED,
    INFERENCE_ID_HEADER,
    BodyCopy,
    Client,
    Counters,
    MiddlewareStats,
    Options,
    header,
    policy_for,
    submit,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("captured.middleware")

_INFERENCE_ID = INFERENCE_ID_HEADER.encode()
_CUSTOM_ATTRIBUTES = CUSTOM_ATTRIBUTES_HEADER.encode()


class CaptureMiddleware:
    """Capture the request and response of every matching HTTP request of an ASGI 3 app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        socket_path: str | None = None,
        client: Client | None = None,
        **options: Unpack[Options],
    ) -> None:
        """`options`: `endpoint_name`, `variant_name`, `methods`, `paths`, `exclude_paths`,
        `capture_errors`, `max_body_bytes` (see `common.Policy` and the README)."""
        if client is not None and socket_path is not None:
            raise ValueError("give socket_path or client, not both")
        self.app = app
        self.policy = policy_for(client, options)
        self.counters = Counters()
        self._socket_path = socket_path
        self._client = client
        self._owned: AsyncCaptureClient | None = None
        self._owned_loop: asyncio.AbstractEventLoop | None = None

    def stats(self) -> MiddlewareStats:
        """What the middleware saw, captured and skipped, by reason."""
        return self.counters.statistics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self._client is None:
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        counters = self.counters
        counters.saw()
        reason = self.policy.skip_reason(scope["method"], scope["path"])
        if reason is not None:
            counters.skip(reason)
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(receive, send, self.policy.max_body_bytes)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except BaseException:
            counters.skip(APP_ERROR)
            raise
        if not exchange.complete or exchange.disconnected:
            counters.skip(DISCONNECTED)
            return
        headers = scope.get("headers", ())
        submit(
            self._capture_client(),
            self.policy,
            counters,
            status=exchange.status,
            request=exchange.request,
            response=exchange.response,
            request_content_type=header(headers, b"content-type"),
            response_content_type=exchange.content_type,
            inference_id_header=header(headers, _INFERENCE_ID),
            custom_attributes_header=header(headers, _CUSTOM_ATTRIBUTES),
        )

    def _capture_client(self) -> Client:
        if self._client is not None:
            return self._client
        loop = asyncio.get_running_loop()
        if self._owned is None or self._owned_loop is not loop:
            if self._owned is not None:
                log.warning(
                    "CaptureMiddleware: requests now run on another event loop; a new capture client"
                    " serves it (records the old one still held are lost). Run the app on one loop"
                    " (with Starlette's TestClient: `with TestClient(app) as client:`)"
                )
            self._owned = AsyncCaptureClient(self._socket_path)
            self._owned_loop = loop
        return self._owned

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """`receive` for the lifespan scope: at shutdown, flush and close the middleware's own
        client (up to its 5 s) before the app hears of the shutdown."""

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self._owned is not None:
                owned, self._owned = self._owned, None
                try:
                    await owned.close()
                except Exception as exc:  # never stop a shutdown
                    log.warning("CaptureMiddleware: closing the capture client failed: %r", exc)
            return message

        return wrapped


class _Exchange:
    """One request/response as it passes: the copies, the status, how it ended."""

    __slots__ = (
        "_receive",
        "_send",
        "complete",
        "content_type",
        "disconnected",
        "request",
        "response",
        "status",
    )

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive = receive
        self._send = send
        self.request = BodyCopy(limit)
        self.response = BodyCopy(limit)
        self.status = 0
        self.content_type: str | None = None
        self.complete = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            self.request.add(message.get("body", b""))
        elif kind == "http.disconnect" and not self.complete:
            self.disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            self.content_type = header(message.get("headers", ()), b"content-type")
        elif kind == "http.response.body":
            self.response.add(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send(message)
                self.complete = True
                return
        await self._send(message)
