"""Fault-injecting proxies to put between a client (or a daemon) and an S3 server in tests.

* `FaultProxy`: a TCP proxy in front of any host:port, run by an asyncio loop in one
  background thread, whose mode (`pass`, `refuse`, `stall`) the test switches at run time.
* `S3FaultProxy`: an HTTP proxy in front of an S3 server that knows each request's S3
  operation and, by a rule the test sets, forwards it, cuts its response after S3 acted on it,
  answers 503 without forwarding, or resets the connection.

Both listen on 127.0.0.1:<free port> (`endpoint_url`) and run only on the standard library and
aiohttp (a dependency of aiobotocore).

    with FaultProxy(server.host, server.port) as proxy:
        proxy.set_mode("stall")
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import re
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Literal, Self

from captured.testing.s3 import LOOPBACK

Mode = Literal["pass", "refuse", "stall"]
MODES: tuple[Mode, ...] = ("pass", "refuse", "stall")


class _LoopThread:
    """A server on an asyncio loop of its own, in one background thread: `start`, `stop`, and a
    context manager. Subclasses define `_start_server` and `_shutdown` (run on that loop)."""

    START_TIMEOUT_S = 5.0

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> Self:
        ready = threading.Event()
        name = type(self).__name__
        self._thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self._thread.start()
        if not ready.wait(self.START_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"{name} did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} thread did not stop")
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start_server())
        except BaseException as exc:
            self._error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _start_server(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError


class FaultProxy(_LoopThread):
    """TCP proxy 127.0.0.1:<free port> -> upstream, with run-time switchable faults.

    Modes (switch with `set_mode`, effective when it returns):
      * `pass`: forward both ways (stalled connections resume);
      * `refuse`: reset new connections at once and cut (RST) every existing one;
      * `stall`: accept new connections but neither forward nor answer; existing
        connections stop forwarding too (so pooled keep-alive connections stall as well);
        all are held open until the mode changes or the proxy stops.
    Counters: `accepted`, `refused`, `bytes_up` (client -> upstream), `bytes_down`,
    `active` (connections open now), `peak_active` (most connections open at once).

    A stalled peer hangs an aiobotocore PutObject/UploadPart whatever its read_timeout: botocore
    sends `Expect: 100-continue` and aiohttp waits for "100 Continue" with no timer, so bound
    such calls with `asyncio.timeout()` (captured's S3 destination does).
    """

    def __init__(self, upstream_host: str, upstream_port: int, host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.accepted = 0
        self.refused = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.peak_active = 0
        super().__init__()
        self._server: asyncio.AbstractServer | None = None
        self._flowing: asyncio.Event | None = None
        self._conns: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def active(self) -> int:
        return len(self._conns)

    # -- test-thread API --------------------------------------------------------------

    def set_mode(self, mode: Mode, timeout: float = 5.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._apply_mode(mode), self._loop).result(timeout)

    def reset_counters(self) -> None:
        self.accepted = self.refused = self.bytes_up = self.bytes_down = self.peak_active = 0

    # -- loop thread ------------------------------------------------------------------

    async def _start_server(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self.mode = mode
        if mode == "pass":
            self._flowing.set()
            return
        self._flowing.clear()
        if mode == "refuse":
            for task, writers in list(self._conns.items()):
                for w in writers:
                    _abort(w)
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task, writers in list(self._conns.items()):
            for w in writers:
                _abort(w)
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            self.refused += 1
            _abort(writer)
            return
        task = asyncio.current_task()
        assert task is not None and self._flowing is not None
        writers = [writer]
        self._conns[task] = writers
        self.peak_active = max(self.peak_active, len(self._conns))
        try:
            await self._flowing.wait()  # stall: hold the accepted connection, say nothing
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            writers.append(up_writer)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer, "bytes_up")),
                asyncio.ensure_future(self._pump(up_reader, writer, "bytes_down")),
            ]
            try:
                # A closed or broken side ends the connection: no half-close (HTTP needs none).
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._conns.pop(task, None)
            for w in writers:
                _abort(w)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while True:
                data = await src.read(65536)
                if not data:
                    return
                await self._flowing.wait()  # stall: hold the bytes (and stop reading)
                # Counted before they go: once the peer has them, the count already says so
                # (counted after drain(), a test reading it right after its request could
                # see the last piece missing).
                setattr(self, counter, getattr(self, counter) + len(data))
                dst.write(data)
                await dst.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Action = Literal["pass", "slow", "cut", "fail", "reset"]
#: Hop-by-hop headers (and those the proxy's HTTP stack sets itself) are not copied across.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "upgrade"}
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def s3_operation(method: str, query: Any) -> str:
    """The S3 operation of a path-style request, from its method and query keys."""
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        return "CompleteMultipartUpload" if "uploadId" in query else "Post"
    if method == "PUT":
        return "UploadPart" if "uploadId" in query else "PutObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "Delete"
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    return method.capitalize()


class S3FaultProxy(_LoopThread):
    """HTTP proxy 127.0.0.1:<free port> -> an S3 server, with a fault decided per request.

    `rule(operation, n)` (n: this operation's 1-based count so far) names the action:
      * `pass`: forward the request and its response unchanged;
      * `slow`: the same, `slow_s` seconds later (requests that must overlap in time do);
      * `cut`: forward it (S3 acts on it), send the response's status, headers and half of its
        body, then reset the connection: a response lost on the way back;
      * `fail`: answer 503 SlowDown without forwarding (S3 never sees it);
      * `reset`: reset the connection without forwarding.
    `seen[(operation, action)]` counts what was done; `peak_in_flight[operation]` is the most
    requests of an operation the proxy held at once. Runs an aiohttp server and client on an
    asyncio loop in one background thread; `rule` may be replaced at any time.

    moto reports one fixed `Initiated` time for every multipart upload; in ListMultipartUploads
    answers the proxy puts the time it saw each upload created (those created through it).
    """

    START_TIMEOUT_S = 10.0

    def __init__(self, upstream: str, host: str = LOOPBACK) -> None:
        super().__init__()
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = 0
        self.rule: Callable[[str, int], Action] = lambda op, n: "pass"
        self.counts: dict[str, int] = {}
        self.seen: dict[tuple[str, str], int] = {}
        self.initiated: dict[str, str] = {}
        self.slow_s = 1.0
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        self._runner: Any = None
        self._session: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def done(self, operation: str, action: str) -> int:
        """How many `operation` requests got `action` so far."""
        return self.seen.get((operation, action), 0)

    async def _start_server(self) -> None:
        import aiohttp
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: Any) -> Any:
        op = s3_operation(request.method, request.query)
        self.in_flight[op] = self.in_flight.get(op, 0) + 1
        self.peak_in_flight[op] = max(self.peak_in_flight.get(op, 0), self.in_flight[op])
        try:
            return await self._act(op, request)
        finally:
            self.in_flight[op] -= 1

    async def _act(self, op: str, request: Any) -> Any:
        from aiohttp import web

        n = self.counts[op] = self.counts.get(op, 0) + 1
        action: Action = self.rule(op, n)
        self.seen[(op, action)] = self.seen.get((op, action), 0) + 1
        body = await request.read()
        if action == "fail":
            return web.Response(status=503, body=_SLOW_DOWN, content_type="application/xml")
        if action == "reset":
            _reset(request.transport)
            raise web.HTTPServiceUnavailable()  # never sent: the connection is gone
        if action == "slow":
            await asyncio.sleep(self.slow_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            # A file object: aiohttp warns (ResourceWarning) about a large body given as bytes.
            data=io.BytesIO(body) if body else None,
            allow_redirects=False,
        ) as up:
            payload = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
        if up.status == 200 and op == "CreateMultipartUpload":
            if (m := re.search(rb"<UploadId>([^<]+)</UploadId>", payload)) is not None:
                now = datetime.datetime.now(datetime.UTC)
                self.initiated[m[1].decode()] = (
                    now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
                )
        elif up.status == 200 and op == "ListMultipartUploads":
            payload = re.sub(rb"<Upload>.*?</Upload>", self._initiated_as_seen, payload, flags=re.S)
        if action in ("pass", "slow"):
            return web.Response(status=up.status, headers=out_headers, body=payload)
        response = web.StreamResponse(status=up.status, headers=out_headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        _reset(request.transport)
        return response

    def _initiated_as_seen(self, m: re.Match[bytes]) -> bytes:
        upload = m[0]
        upload_id = re.search(rb"<UploadId>([^<]+)</UploadId>", upload)
        when = self.initiated.get(upload_id[1].decode()) if upload_id else None
        if when is None:
            return upload
        return re.sub(rb"<Initiated>[^<]*</Initiated>", f"<Initiated>{when}</Initiated>".encode(), upload)


def _reset(transport: Any) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if transport is not None:
        transport.abort()
