"""`AsyncCaptureClient`: the `CaptureClient` contract for asyncio applications, without threads.

`capture()` is a plain method: it validates (`record.prepare_record`), appends one tuple to a
bounded buffer and returns; it never awaits and never raises because of the daemon. One
background task, started lazily on first use inside a running loop, does all the I/O:

* it takes the whole buffer at once, encodes it with `record.batch_frames` and writes the frames
  one at a time. The transport's high-water mark is 0, so `pause_writing` fires whenever a frame
  did not go to the kernel at once, and `resume_writing` fires exactly when it has. A frame is
  "written" only then; a frame still (partly) buffered when the connection breaks goes out again
  whole on the next connection (the daemon discards a truncated frame, so this never duplicates);
* nothing new is taken while frames are unwritten, so the task never holds more than one
  buffer's worth of encoded frames: a stalled daemon makes records wait, then drop
  (`buffer_full`), in the caller's bounded buffer;
* the protocol's `data_received` parses ACK and ERROR frames (`frames.FrameReader`);
* it reconnects with capped exponential backoff (0.05 s doubling up to `reconnect_max_s`), and
  waits `reconnect_max_s` after the daemon refused the connection with an ERROR.

`flush()` is True once the daemon ACKed a FLUSH sent after everything captured before the call.
When a connection breaks with records written on it but not acknowledged, every flush still
waiting (written, queued or not yet taken) answers False: those records may be lost.

Delivery guarantee: at most once, as for `CaptureClient`. Use it from the loop's thread only;
the task lives with its loop, and when that loop ends the client is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
from collections import deque
from typing import Any, NamedTuple, cast

import msgspec

from . import frames
from .config import SIX_MIB
from .record import (
    BUFFER_FULL,
    CLOSED,
    DEFAULT_BATCH_BYTES,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_SOCKET_PATH,
    REJECTED,
    Body,
    RecordTuple,
    batch_frames,
    buffer_takes,
    prepare_record,
)

log = logging.getLogger("captured.aclient")

_CONNECT_TIMEOUT_S = 1.0
_STOP_TIMEOUT_S = 1.0  # how long close() lets the task write what it still holds
_MAX_LOGGED = 64  # distinct causes remembered for log-once: bounded even if messages vary


class _Flush(NamedTuple):
    seq: int
    future: asyncio.Future[bool]  # resolved once; a caller that timed out no longer awaits it

    def resolve(self, ok: bool) -> None:
        if not self.future.done():
            self.future.set_result(ok)


class _Conn(asyncio.Protocol):
    """One connection: flow-control state, ACK/ERROR parsing, per-connection record counts."""

    def __init__(self, client: AsyncCaptureClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = frames.FrameReader()
        self.paused = False
        self.inflight = False  # outq[0] was handed to the transport and is not written yet
        self.lost = False
        self.refused = False  # the daemon sent ERROR: reconnect slowly
        self.drained = asyncio.Event()  # set by resume_writing and connection_lost
        self.records = 0  # records completely written on this connection
        self.acked = 0  # records the daemon said it took from this connection
        self.awaiting: deque[_Flush] = deque()  # FLUSH frames written, ACK not yet seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # High-water mark 0: pause_writing means "this frame is not yet in the kernel".
        self.transport.set_write_buffer_limits(high=0)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        # Synchronous bookkeeping: an ACK for this frame can only be read after this point.
        self.paused = False
        if self.inflight:
            self.inflight = False
            self.client._written(self)
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        try:
            for kind, payload in self.reader.feed(data):
                if kind == frames.Kind.ACK:
                    self.client._on_ack(self, frames.ack_decoder.decode(payload))
                elif kind == frames.Kind.ERROR:
                    self.client._on_error(self, bytes(payload).decode("utf-8", "replace"))
                    return
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
        socket_path: str = DEFAULT_SOCKET_PATH,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        max_body_bytes: int = SIX_MIB,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        reconnect_max_s: float = 2.0,
    ) -> None:
        if max_body_bytes * 2 + 65536 > frames.DEFAULT_MAX_FRAME_BYTES:
            raise ValueError("max_body_bytes is too large for the daemon's maximum frame size")
        self.socket_path = socket_path
        self._buffer_bytes = buffer_bytes
        self._max_body = max_body_bytes
        self._batch_bytes = batch_bytes
        self._reconnect_max_s = reconnect_max_s
        self._pending: list[RecordTuple] = []
        self._sizes: list[int] = []
        self._pending_bytes = 0
        self._flushes: list[_Flush] = []
        self._next_seq = 0
        self._captured = self._sent = self._acknowledged = 0
        self._dropped: dict[str, int] = {}
        self._closed = False
        # Task state; the events are made with the task, inside the loop that runs it.
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._outq: deque[tuple[bytes, int, _Flush | None]] = deque()  # (frame, records, flush)
        self._conn: _Conn | None = None
        self._backoff = 0.05
        self._next_connect = 0.0
        self._logged: set[str] = set()  # causes already logged: one line each

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
        )
        self._captured += 1
        if self._closed:
            self._drop(CLOSED, 1)
            return False
        if not buffer_takes(self._pending_bytes, size, self._buffer_bytes, empty=not self._pending):
            self._drop(BUFFER_FULL, 1)
            return False
        was_empty = not self._pending
        self._pending.append(rec)
        self._sizes.append(size)
        self._pending_bytes += size
        if self._task is None:
            self._ensure_started()
        elif was_empty and self._wake is not None:
            self._wake.set()  # the task takes the whole buffer: one wake-up per refill
        return True

    async def start(self) -> None:
        """Start the background task now (otherwise the first use inside a loop does)."""
        self._ensure_started()

    async def flush(self, timeout: float = 5.0) -> bool:
        """True once the daemon confirmed it processed every record captured before this call."""
        self._ensure_started()
        if self._closed:
            return False  # nothing can be confirmed any more
        self._next_seq += 1
        f = _Flush(self._next_seq, asyncio.get_running_loop().create_future())
        self._flushes.append(f)
        if self._wake is not None:
            self._wake.set()
        await asyncio.wait((f.future,), timeout=timeout)  # never cancels the future on timeout
        return f.future.done() and f.future.result()

    def stats(self) -> dict[str, Any]:
        return {
            "captured": self._captured,
            "sent": self._sent,
            "acknowledged": self._acknowledged,
            "buffered": len(self._pending),
            "dropped": dict(self._dropped),
        }

    async def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, then stop; what is still unsent is counted `closed`."""
        if not self._closed:
            await self.flush(timeout)
            self._closed = True
        task = self._task
        if task is None or task.done():
            self._finish()  # never started: nothing else will count the buffer as dropped
            return
        assert self._wake is not None and self._stopping is not None
        self._wake.set()
        self._stopping.set()
        await asyncio.wait((task,), timeout=_STOP_TIMEOUT_S)
        if not task.done():  # stalled on a daemon that does not read: give up what is left
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> AsyncCaptureClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged and len(self._logged) < _MAX_LOGGED:
            self._logged.add(key)
            log.warning(msg, *args)

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def _ensure_started(self) -> None:
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # captured outside a loop: the buffer waits for the first use inside one
        self._wake, self._stopping = asyncio.Event(), asyncio.Event()
        self._task = loop.create_task(self._run(), name="captured-client")

    # ---- background task ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._send_loop()
        except Exception:  # never let the task die silently
            log.exception("captured client task failed")
        finally:
            self._closed = True
            self._finish()

    async def _send_loop(self) -> None:
        assert self._wake is not None
        while True:
            self._take()
            if not self._outq:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            conn = self._conn
            if conn is None or conn.lost:
                if self._closed:
                    return  # closing and not connected: give up what is left
                conn = self._conn = await self._connect()
                if conn is None:
                    continue
            await self._write_one(conn)

    def _take(self) -> None:
        """Move the caller's buffer into encoded frames, but only once earlier frames are written."""
        if self._outq:
            return
        records, sizes, flushes = self._pending, self._sizes, self._flushes
        if records or flushes:
            self._pending, self._sizes, self._flushes, self._pending_bytes = [], [], [], 0
        if records:
            for data, n in batch_frames(records, sizes, self._batch_bytes):
                self._outq.append((data, n, None))
        for f in flushes:
            self._outq.append((frames.encode_frame(frames.Kind.FLUSH, (f.seq,)), 0, f))

    async def _connect(self) -> _Conn | None:
        loop = asyncio.get_running_loop()
        assert self._stopping is not None
        delay = self._next_connect - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):  # close() cuts the wait short
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._closed:
                return None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Conn(self), self.socket_path), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            self._next_connect = loop.time() + self._backoff
            self._backoff = min(self._backoff * 2, self._reconnect_max_s)
            self._log_once(
                f"connect:{exc!r}", "cannot reach the capture daemon at %s: %r", self.socket_path, exc
            )
            return None
        self._backoff = 0.05
        # Connect failures are logged again after a success; a daemon's refusal only once ever.
        self._logged = {k for k in self._logged if not k.startswith("connect:")}
        return conn

    async def _write_one(self, conn: _Conn) -> None:
        """Hand outq[0] to the transport; wait until the kernel has all of it or the link broke."""
        transport = conn.transport
        assert transport is not None
        conn.drained.clear()
        if not transport.is_closing():
            transport.write(self._outq[0][0])
            # Closing now means the write failed: the frame stays first for the next connection.
            if not transport.is_closing():
                if not conn.paused:
                    self._written(conn)
                    return
                conn.inflight = True
        await conn.drained.wait()  # resume_writing, or connection_lost (which always follows closing)
        if conn.inflight and conn.refused:
            # The daemon refused the frame it was reading (by its header, say): resending it
            # would be refused again forever. Lost otherwise: resent whole on the next connection.
            self._drop(REJECTED, self._outq.popleft()[1])
        conn.inflight = False

    def _written(self, conn: _Conn) -> None:
        _, n, flush = self._outq.popleft()
        conn.records += n
        self._sent += n
        if flush is not None:
            conn.awaiting.append(flush)

    def _on_ack(self, conn: _Conn, ack: frames.Ack) -> None:
        self._acknowledged += ack.records - conn.acked
        conn.acked = ack.records
        while conn.awaiting and conn.awaiting[0].seq <= ack.seq:
            conn.awaiting.popleft().resolve(True)

    def _on_error(self, conn: _Conn, message: str) -> None:
        self._log_once(f"error:{message}", "the capture daemon refused the connection: %s", message)
        conn.refused = True
        conn.abort()

    def _on_lost(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        delay = self._reconnect_max_s if conn.refused else self._backoff
        self._next_connect = loop.time() + delay
        if conn.records > conn.acked:
            # Records written on this connection may be lost with it: no flush waiting now can
            # be confirmed (every one of them was asked for after those records).
            self._resolve_all(conn, False)
        else:
            # Everything written here was taken by the daemon, so were the records before them.
            for f in conn.awaiting:
                f.resolve(True)
        conn.awaiting.clear()

    def _resolve_all(self, conn: _Conn | None, ok: bool) -> None:
        """Answer every flush still waiting: written, encoded or not yet taken."""
        waiting = [e[2] for e in self._outq if e[2] is not None] + self._flushes
        for f in [*(conn.awaiting if conn is not None else ()), *waiting]:
            f.resolve(ok)

    def _finish(self) -> None:
        """After the task: close the link, count what was not sent, answer waiting flushes."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.lost:
            conn.abort()
        self._resolve_all(conn, False)
        self._drop(CLOSED, sum(n for _, n, _ in self._outq) + len(self._pending))
        self._outq.clear()
        self._pending, self._sizes, self._flushes, self._pending_bytes = [], [], [], 0
