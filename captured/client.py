"""The library a model server imports: `capture()` never blocks on I/O and never raises
because of the daemon.

`capture()` validates its arguments (programming errors raise `TypeError` / `ValueError`),
appends one tuple to a bounded in-memory buffer (default 8 MiB of bodies) and returns. A
background I/O thread takes the whole buffer at once, encodes it into BATCH frames (see
`captured.frames`), writes them to the daemon's socket, reads ACKs, and reconnects with capped
backoff. When the buffer is full the record is dropped and counted (`buffer_full`); nothing
ever waits on the daemon in the caller's thread.

Delivery guarantee: at most once. A frame whose write was interrupted by a broken connection is
sent again whole on the next connection (the daemon discards a truncated frame, so this never
duplicates). A frame fully written to a daemon that then dies unread is lost; `flush()` is how a
caller learns that everything so far was processed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any

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

log = logging.getLogger("captured.client")


#: The I/O thread encodes at most about this much per pass (one pass holds the GIL).
TAKE_BYTES = 512 * 1024

#: After close(): how long the I/O thread still tries to write what is left.
CLOSE_GRACE_S = 0.5


class _Flush:
    __slots__ = ("done", "ok", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.done = threading.Event()
        self.ok = False


class CaptureClient:
    """Thread-safe capture client backed by one background I/O thread.

    >>> client = CaptureClient("/run/captured/capture.sock")
    >>> client.capture(b"1,2,3", b"0.5", request_content_type="text/csv",
    ...                response_content_type="text/csv")
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
        self._start()
        _live_clients.add(self)

    def _start(self) -> None:
        """(Re)create all per-process state: also run in a child after `fork()`."""
        self._lock = threading.Lock()
        self._pending: list[RecordTuple] = []
        self._sizes: list[int] = []
        self._pending_bytes = 0
        self._flushes: list[_Flush] = []
        self._next_seq = 0
        self._captured = 0
        self._sent = 0
        self._acknowledged = 0
        self._dropped: dict[str, int] = {}
        self._closed = False
        self._wake_armed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._io: _IOLoop | None = None
        self._thread = threading.Thread(target=self._io_loop, name="captured-client", daemon=True)
        self._thread.start()

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
        with self._lock:
            self._captured += 1
            if self._closed:
                self._drop(CLOSED, 1)
                return False
            if not buffer_takes(self._pending_bytes, size, self._buffer_bytes, empty=not self._pending):
                self._drop(BUFFER_FULL, 1)
                return False
            self._pending.append(rec)
            self._sizes.append(size)
            self._pending_bytes += size
            if self._wake_armed:
                return True
            self._wake_armed = True
        self._wake()
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """True once the daemon confirmed it processed every record captured before this call."""
        with self._lock:
            if self._closed:
                return False
            self._next_seq += 1
            f = _Flush(self._next_seq)
            self._flushes.append(f)
            self._wake_armed = True
        self._wake()
        return f.done.wait(timeout) and f.ok

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "captured": self._captured,
                "sent": self._sent,
                "acknowledged": self._acknowledged,
                "buffered": len(self._pending),
                "dropped": dict(self._dropped),
            }

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, then stop; what is still unsent is counted `closed`."""
        if self._closed:
            return
        self.flush(timeout)
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=1.0)
        _live_clients.discard(self)

    def __enter__(self) -> CaptureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _drop(self, reason: str, n: int) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + n

    # ---- I/O thread --------------------------------------------------------------------

    def _io_loop(self) -> None:
        try:
            self._io = _IOLoop(self)
            self._io.run()
        except Exception:  # never let the thread die silently
            log.exception("captured client I/O thread failed")
        finally:
            with self._lock:
                self._closed = True
                if self._pending:
                    self._drop(CLOSED, len(self._pending))
                    self._pending, self._sizes, self._pending_bytes = [], [], 0
                for f in self._flushes:
                    f.done.set()
                self._flushes = []
            os.close(self._wake_r)
            os.close(self._wake_w)


def _chunk_length(sizes: list[int], limit: int) -> int:
    """How many leading records fit in `limit` bytes (at least one)."""
    acc = 0
    for i, size in enumerate(sizes):
        acc += size
        if acc > limit:
            return max(i, 1)
    return len(sizes)


class _IOLoop:
    """The client's background I/O: one socket, one select loop, no locks held across I/O."""

    def __init__(self, client: CaptureClient) -> None:
        self.c = client
        self.sock: socket.socket | None = None
        self.reader = frames.FrameReader()
        # Frames not yet completely written: (frame bytes, records in it, flush or None).
        self.outq: deque[tuple[bytes, int, _Flush | None]] = deque()
        self.offset = 0  # bytes of outq[0] already written on this connection
        self.awaiting: deque[_Flush] = deque()  # FLUSH frames written, ACK not yet seen
        self.conn_records = 0  # records fully written on this connection
        self.conn_acked = 0  # records the daemon acknowledged on this connection
        self.backoff = 0.05
        self.next_connect = 0.0
        self.errors_logged: set[str] = set()

    def run(self) -> None:
        c = self.c
        give_up_at: float | None = None
        while True:
            closing = self._take()
            if closing and not self.outq and not self.awaiting:
                break
            if self.sock is None and time.monotonic() >= self.next_connect:
                self._connect()
            rlist: list[int] = [c._wake_r]
            wlist: list[int] = []
            timeout: float | None = None
            if self.sock is not None:
                rlist.append(self.sock.fileno())
                if self.outq:
                    wlist.append(self.sock.fileno())
            else:
                timeout = max(0.0, self.next_connect - time.monotonic())
            if closing:
                # close() already waited for its flush; allow one last short attempt, no more.
                if give_up_at is None:
                    give_up_at = time.monotonic() + CLOSE_GRACE_S
                if self.sock is None or time.monotonic() >= give_up_at:
                    break
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            r, w = _wait(rlist, wlist, timeout)
            if c._wake_r in r:
                with contextlib.suppress(BlockingIOError):
                    os.read(c._wake_r, 4096)
            if self.sock is not None and self.sock.fileno() in r:
                self._read()
            if self.sock is not None and self.sock.fileno() in w:
                self._write()
        self._disconnect(None)
        unsent = sum(n for _, n, _ in self.outq)
        if unsent:
            with c._lock:
                c._drop(CLOSED, unsent)

    def _take(self) -> bool:
        """Move the caller's buffer into encoded frames; return True when closing.

        Takes nothing while earlier frames are still unwritten: records then wait in the
        caller's bounded buffer (and are dropped there when it is full), so a stalled daemon
        never makes this thread hold more than one buffer's worth of encoded frames.
        """
        c = self.c
        with c._lock:
            closing = c._closed
            if self.outq:
                return closing  # leave _wake_armed set: no wake-ups until there is room
            records, sizes, flushes = c._pending, c._sizes, c._flushes
            n = _chunk_length(sizes, TAKE_BYTES)
            if n < len(records):
                # Take a chunk only: encoding holds the GIL, and a whole 8 MiB buffer at once
                # kept callers of capture() waiting for milliseconds (bench/client_overhead.py).
                # The FLUSHes wait for the records captured before them.
                taken = sum(sizes[:n])
                records, sizes, flushes = records[:n], sizes[:n], []
                del c._pending[:n], c._sizes[:n]
                c._pending_bytes -= taken
            else:
                c._wake_armed = False
                if records or flushes:
                    c._pending, c._sizes, c._flushes, c._pending_bytes = [], [], [], 0
        if records:
            for data, n in batch_frames(records, sizes, c._batch_bytes):
                self.outq.append((data, n, None))
        for f in flushes:
            self.outq.append((frames.encode_frame(frames.Kind.FLUSH, (f.seq,)), 0, f))
        return closing

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(1.0)
        try:
            sock.connect(self.c.socket_path)
        except OSError as exc:
            sock.close()
            self.next_connect = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.c._reconnect_max_s)
            self._log_once(
                f"connect:{exc.errno}", "cannot reach the capture daemon at %s: %s", self.c.socket_path, exc
            )
            return
        sock.setblocking(False)
        self.sock = sock
        self.reader = frames.FrameReader()
        self.offset = 0
        self.conn_records = self.conn_acked = 0
        self.backoff = 0.05

    def _write(self) -> None:
        assert self.sock is not None
        while self.outq:
            data, n, flush = self.outq[0]
            try:
                sent = self.sock.send(memoryview(data)[self.offset :])
            except BlockingIOError:
                return
            except OSError as exc:
                self._disconnect(exc)
                return
            self.offset += sent
            if self.offset < len(data):
                return
            self.outq.popleft()
            self.offset = 0
            self.conn_records += n
            if n:
                with self.c._lock:
                    self.c._sent += n
            if flush is not None:
                self.awaiting.append(flush)

    def _read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._disconnect(exc)
            return
        if not data:
            self._disconnect(ConnectionResetError("the daemon closed the connection"))
            return
        try:
            for kind, payload in self.reader.feed(data):
                if kind == frames.Kind.ACK:
                    self._on_ack(frames.ack_decoder.decode(payload))
                elif kind == frames.Kind.ERROR:
                    self._on_error(bytes(payload).decode("utf-8", "replace"))
                    return
            self.reader.check()
        except (frames.ProtocolError, msgspec.DecodeError) as exc:
            self._disconnect(exc)

    def _on_ack(self, ack: frames.Ack) -> None:
        self.errors_logged.clear()  # a healthy exchange: report the next failure again
        with self.c._lock:
            self.c._acknowledged += ack.records - self.conn_acked
        self.conn_acked = ack.records
        while self.awaiting and self.awaiting[0].seq <= ack.seq:
            f = self.awaiting.popleft()
            f.ok = True
            f.done.set()

    def _on_error(self, message: str) -> None:
        """The daemon refused this connection; a frame it cut short is dropped, not resent.

        A frame refused by its header (too large, wrong version) may be the one only partly
        written; resending it would be refused again forever.
        """
        self._log_once(f"error:{message}", "the capture daemon refused the connection: %s", message)
        if self.offset and self.outq:
            _, n, _ = self.outq.popleft()
            with self.c._lock:
                self.c._drop(REJECTED, n)
        self._disconnect(None, slow=True)

    def _disconnect(self, exc: BaseException | None, *, slow: bool = False) -> None:
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        if exc is not None and not isinstance(exc, OSError | ConnectionError):
            log.warning("captured client: %s", exc)
        # A partly written frame goes out again whole on the next connection.
        self.offset = 0
        # Records written but not acknowledged may be lost with the connection: no flush made
        # before now can be confirmed, whether its FLUSH frame was written, queued or not yet
        # taken from the caller. Without such records, written FLUSHes are confirmed already.
        uncertain = self.conn_records > self.conn_acked
        for f in self.awaiting:
            f.ok = not uncertain
            f.done.set()
        self.awaiting.clear()
        if uncertain:
            self._fail_flushes()
        delay = self.c._reconnect_max_s if slow else self.backoff
        self.next_connect = time.monotonic() + delay
        if exc is not None and getattr(exc, "errno", None) not in (None, errno.EPIPE, errno.ECONNRESET):
            self._log_once(f"io:{exc}", "connection to the capture daemon lost: %s", exc)

    def _fail_flushes(self) -> None:
        """Resolve every flush not yet confirmed as failed and drop its queued FLUSH frame."""
        queued = [f for _, _, f in self.outq if f is not None]
        self.outq = deque(item for item in self.outq if item[2] is None)
        with self.c._lock:
            queued += self.c._flushes
            self.c._flushes = []
        for f in queued:
            f.ok = False
            f.done.set()

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        """One line per distinct cause until the daemon acknowledges something again."""
        if key not in self.errors_logged and len(self.errors_logged) < 64:
            self.errors_logged.add(key)
            log.warning(msg, *args)


_live_clients: weakref.WeakSet[CaptureClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread does not survive fork(): give each inherited client fresh state and a thread,
    # and close the descriptors the parent's I/O thread owned (they are the parent's now).
    for client in list(_live_clients):
        io = client._io
        if io is not None and io.sock is not None:
            with contextlib.suppress(OSError):
                io.sock.close()  # close(2) only drops the child's copy; the parent's stays up
        for fd in (client._wake_r, client._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        client._start()


def _close_all_at_exit() -> None:
    for client in list(_live_clients):
        with contextlib.suppress(Exception):
            client.close(timeout=1.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP
_POLL_OUT = select.POLLOUT | select.POLLERR | select.POLLHUP


def _wait(readers: list[int], writers: list[int], timeout: float | None) -> tuple[set[int], set[int]]:
    """Which of these file descriptors are ready: poll(2), which, unlike select(2), works for
    descriptors past 1023 (a model server with many open connections has those)."""
    poller = select.poll()
    for fd in readers:
        poller.register(fd, select.POLLIN)
    for fd in writers:
        poller.modify(fd, select.POLLIN | select.POLLOUT) if fd in readers else poller.register(
            fd, select.POLLOUT
        )
    r: set[int] = set()
    w: set[int] = set()
    for fd, events in poller.poll(None if timeout is None else timeout * 1000):
        if events & _POLL_IN:
            r.add(fd)
        if events & _POLL_OUT and fd in writers:
            w.add(fd)
    return r, w
