"""`AsyncCaptureClient`: the `CaptureClient` contract for asyncio applications, without threads.

`capture()` is a plain method: it validates (`record.prepare_record`), appends one tuple to a
bounded buffer and returns; it never awaits and never raises because of the daemon. One
background task, started lazily on first use inside a running loop, does all the I/O: it
encodes the buffer once a batch is full or `linger_s` after its first record (at most about
512 KiB per pass, yielding to the application's other tasks between passes), writes the frames,
reads acknowledgements and reconnects with capped backoff.

The bookkeeping is the I/O-free `core.ClientCore`, shared with the thread client, so both
make the same promises: records stay buffered until the daemon acknowledges them and are sent
again after a reconnect (protocol 2: nothing accepted is lost or written twice across a
restart or a crash of the daemon), and `flush()` is True only when every record accepted
before it is in the spool or was dropped under a counted reason.

The transport's high-water mark is 0, so `pause_writing` fires whenever a frame did not go to
the kernel at once, and `resume_writing` exactly when it has: a frame counts as written only
then. Use the client from its loop's thread only; the task lives with its loop, and when that
loop ends the client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import time
from typing import Any, cast

import msgspec

from captured.client.core import ClientCore, Waiter
from captured.client.record import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_LINGER_S,
    Body,
    check_endpoint,
    check_options,
    prepare_record,
)
from captured.wire import frames
from captured.wire.rules import MAX_BODY_BYTES, find_socket

log = logging.getLogger("captured.aclient")

_CONNECT_TIMEOUT_S = 1.0
_STOP_TIMEOUT_S = 1.0  # how long close() lets the task wait for what is unacknowledged
_MAX_LOGGED = 64  # distinct causes remembered for log-once: bounded even if messages vary
#: Encoded per pass of the task: one pass holds the event loop.
TAKE_BYTES = 512 * 1024


def _resolve(w: Waiter) -> None:
    fut: asyncio.Future[None] = w.signal
    if not fut.done():
        fut.set_result(None)


class _Conn(asyncio.Protocol):
    """One connection: flow-control state and the frames the daemon sends."""

    def __init__(self, client: AsyncCaptureClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = frames.FrameReader()
        self.paused = False
        self.lost = False
        self.refused = False  # the daemon sent ERROR: reconnect slowly
        self.drained = asyncio.Event()  # set by resume_writing and connection_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # High-water mark 0: pause_writing means "this frame is not yet in the kernel".
        self.transport.set_write_buffer_limits(high=0)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        core = self.client._core
        try:
            for kind, payload in self.reader.feed(data):
                acknowledged = core.counters.acknowledged
                error = core.on_frame(kind, payload)
                if error is not None:
                    self.client._on_error(self, error)
                    return
                if core.counters.acknowledged > acknowledged:
                    self.client._logged.clear()  # healthy again: report the next failure
        except (frames.ProtocolError, msgspec.DecodeError) as exc:
            log.warning("captured client: %s", exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.client._on_lost(self)
        self.drained.set()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # not close(): that would wait to flush a stalled frame


class AsyncCaptureClient:
    """Capture client for asyncio; one background task, no threads.

    >>> async with AsyncCaptureClient("/run/captured/capture.sock") as client:
    ...     client.capture(b"1,2,3", b"0.5", request_content_type="text/csv",
    ...                    response_content_type="text/csv")
    True
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        endpoint_name: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
        reconnect_max_s: float = 2.0,
    ) -> None:
        check_options(max_body_bytes, linger_s)
        check_endpoint(endpoint_name)
        #: The endpoint of this client's captures (None: the daemon's default endpoint);
        #: `capture(endpoint_name=...)` overrides it per call.
        self.endpoint_name = endpoint_name
        # As CaptureClient: None means look for the socket again at each connection attempt.
        self._socket_arg = socket_path
        self.socket_path = find_socket(socket_path)
        self._max_body = max_body_bytes
        self._reconnect_max_s = reconnect_max_s
        self._core = ClientCore(
            buffer_bytes=buffer_bytes,
            batch_bytes=batch_bytes,
            linger_s=linger_s,
            on_done=_resolve,
            clock=time.monotonic,
        )
        self._closing = False
        # Task state; the event is made with the task, inside the loop that runs it.
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._armed = False  # the task looks at the buffer by itself: capture() need not wake it
        self._full_woken = False
        self._armed_until = 0.0
        self._conn: _Conn | None = None
        self._backoff = 0.05
        self._next_connect = 0.0
        self._logged: set[str] = set()  # causes already logged: one line each
        self._fallback_logged = False

    @property
    def max_body_bytes(self) -> int:
        """The largest body `capture()` takes."""
        return self._max_body

    # ---- caller side -------------------------------------------------------------------

    def capture(
        self,
        request_body: Body,
        response_body: Body,
        *,
        request_content_type: str | None = None,
        response_content_type: str | None = None,
        inference_id: str | None = None,
        custom_attributes: str | None = None,
        variant_name: str | None = None,
        event_id: str | None = None,
        inference_time: _dt.datetime | float | None = None,
        endpoint_name: str | None = None,
    ) -> bool:
        """Queue one request/response pair; False when it was dropped (counted in `stats()`)."""
        rec, size = prepare_record(
            request_body,
            response_body,
            request_content_type,
            response_content_type,
            inference_id,
            custom_attributes,
            variant_name,
            event_id,
            inference_time,
            self._max_body,
            endpoint_name,
            self.endpoint_name,
        )
        core = self._core
        if not core.admit(rec, size):
            return False
        if self._task is None:
            self._ensure_started()
        elif not self._armed:
            self._armed = True
            self._poke()
        elif not self._full_woken and core.batch_full():
            self._full_woken = True
            self._poke()
        return True

    async def start(self) -> None:
        """Start the background task now (otherwise the first use inside a loop does)."""
        self._ensure_started()

    async def flush(self, timeout: float = 5.0) -> bool:
        """True once every record `capture()` accepted before this call is in the daemon's spool
        or was dropped under a counted reason, and none of them was dropped by this client
        while it waited; False on timeout."""
        self._ensure_started()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w = self._core.add_waiter(fut)
        if w.done:
            return w.ok
        self._poke()
        await asyncio.wait((fut,), timeout=timeout)  # never cancels the future on timeout
        return fut.done() and w.ok

    def stats(self) -> dict[str, Any]:
        """As `CaptureClient.stats()`: captured = acknowledged + buffered + sum(dropped)."""
        return self._core.stats()

    async def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, then stop; what is still buffered is counted `closed`."""
        if not self._closing:
            await self.flush(timeout)
            self._closing = True
            self._core.closed = True
        task = self._task
        if task is None or task.done():
            self._finish()  # never started: nothing else counts the buffer as dropped
            return
        self._poke()
        await asyncio.wait((task,), timeout=_STOP_TIMEOUT_S)
        if not task.done():  # stalled on a daemon that does not answer: give up what is left
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> AsyncCaptureClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged and len(self._logged) < _MAX_LOGGED:
            self._logged.add(key)
            log.warning(msg, *args)

    def _ensure_started(self) -> None:
        if self._task is not None or self._closing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # captured outside a loop: the buffer waits for the first use inside one
        self._wake = asyncio.Event()
        self._armed = True
        self._task = loop.create_task(self._run(), name="captured-client")

    # ---- background task ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._send_loop()
        except Exception:  # never let the task die silently
            log.exception("captured client task failed")
        finally:
            self._closing = True
            self._finish()

    async def _send_loop(self) -> None:
        assert self._wake is not None
        core = self._core
        give_up_at: float | None = None
        while True:
            now = time.monotonic()
            if self._closing:
                if core.resolved() >= core.next_seq:
                    return
                if give_up_at is None:
                    give_up_at = now + _STOP_TIMEOUT_S
                elif now >= give_up_at:
                    return
            conn = self._conn
            if conn is None or conn.lost:
                if self._closing:
                    return  # closing and not connected: give up what is left
                conn = self._conn = await self._connect()
                continue
            if core.due(now):
                core.add_frames(core.encode(core.take(TAKE_BYTES)))
                self._full_woken = False
                self._armed_until = now + core.linger_s
                await asyncio.sleep(0)  # one pass at a time: the application's tasks run between
                continue
            data = core.next_write()
            if data is not None:
                await self._write(conn, data)
                continue
            if not core.pending and now >= self._armed_until and not self._closing:
                self._armed = False  # idle: the next capture() wakes the task
            timeouts = []
            deadline = core.deadline()
            if deadline is not None:
                timeouts.append(deadline - now)
            if self._armed and not core.pending:
                timeouts.append(self._armed_until - now)
            if self._closing:
                timeouts.append(0.05)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(timeouts)) if timeouts else None)

    async def _write(self, conn: _Conn, data: bytes) -> None:
        """Hand one frame to the transport; wait until the kernel has all of it or the link broke."""
        transport = conn.transport
        assert transport is not None
        conn.drained.clear()
        if transport.is_closing():
            await conn.drained.wait()  # connection_lost follows closing
            return
        transport.write(data)
        if not conn.paused and not transport.is_closing():
            self._core.written(data)
            return
        await conn.drained.wait()  # resume_writing, or connection_lost
        if not conn.lost:
            self._core.written(data)

    async def _connect(self) -> _Conn | None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        delay = self._next_connect - time.monotonic()
        if delay > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # close() and flush() cut the wait short
                await asyncio.wait_for(self._wake.wait(), delay)
            if time.monotonic() < self._next_connect:
                return None
        self.socket_path = find_socket(self._socket_arg)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Conn(self), self.socket_path), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            self._next_connect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._reconnect_max_s)
            self._log_once(
                f"connect:{exc!r}", "cannot reach the capture daemon at %s: %r", self.socket_path, exc
            )
            return None
        self._backoff = 0.05
        # Connect failures are logged again after a success; a daemon's refusal only once ever.
        self._logged = {k for k in self._logged if not k.startswith("connect:")}
        self._core.connection_made()
        return conn

    def _on_error(self, conn: _Conn, message: str) -> None:
        if self._core.refused(message):
            if not self._fallback_logged:
                self._fallback_logged = True
                log.warning(
                    "the capture daemon at %s speaks protocol version 1 only: capturing at most once "
                    "(records in flight when it restarts can be lost; upgrade it for lossless restarts)",
                    self.socket_path,
                )
        else:
            self._log_once(f"error:{message}", "the capture daemon refused the connection: %s", message)
            conn.refused = True
        conn.abort()

    def _on_lost(self, conn: _Conn) -> None:
        delay = self._reconnect_max_s if conn.refused else self._backoff
        self._next_connect = time.monotonic() + delay
        self._core.connection_lost()
        self._poke()

    def _finish(self) -> None:
        """After the task: close the link, count what was not delivered, answer waiting flushes."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.lost:
            conn.abort()
        self._core.close()
