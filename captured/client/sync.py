"""The library a model server imports: `capture()` never blocks on I/O and never raises
because of the daemon.

`capture()` validates its arguments (programming errors raise `TypeError` / `ValueError`),
appends one tuple to a bounded in-memory buffer (default 8 MiB) and returns. A background I/O
thread sends the buffer in BATCH frames (see `captured.wire.frames`) once a batch is full or
`linger_s` after its first record (so a model server calling `capture()` once per request
costs no wake-up per call), reads acknowledgements and reconnects with capped backoff. When the
buffer is full the record is dropped and counted (`buffer_full`); nothing ever waits on the
daemon in the caller's thread.

All the bookkeeping (admission, sequence numbers, acknowledgements, resend, counters) is the
I/O-free `core.ClientCore`, shared with `AsyncCaptureClient`; this module only moves
bytes. Delivery guarantee (protocol 2): nothing `capture()` accepted is lost or written twice
across a restart or a crash of the daemon while this process lives and the buffer did not
overflow: records stay in the buffer until the daemon acknowledges them and are sent again
after a reconnect. With a daemon that speaks only protocol 1: at most once (see `core`).
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
from typing import Any

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

log = logging.getLogger("captured.client")


#: The I/O thread encodes at most about this much per pass (one pass holds the GIL).
TAKE_BYTES = 512 * 1024

#: After close(): how long the I/O thread still waits for what is unacknowledged.
CLOSE_GRACE_S = 0.5


def _signal(w: Waiter) -> None:
    w.signal.set()


class CaptureClient:
    """Thread-safe capture client backed by one background I/O thread.

    >>> client = CaptureClient("/run/captured/capture.sock")
    >>> client.capture(b"1,2,3", b"0.5", request_content_type="text/csv",
    ...                response_content_type="text/csv")
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
        #: The path given, or None: then each connection attempt looks for the socket again
        #: (`captured.wire.rules.find_socket`: $CAPTURED_SOCKET, the systemd path, the Quick
        #: start's ./captured-data/capture.sock), so a daemon started later is still found.
        self._socket_arg = socket_path
        self.socket_path = find_socket(socket_path)
        self._buffer_bytes = buffer_bytes
        self._max_body = max_body_bytes
        self._batch_bytes = batch_bytes
        self._linger_s = linger_s
        self._reconnect_max_s = reconnect_max_s
        self._start()
        _live_clients.add(self)

    def _start(self) -> None:
        """(Re)create all per-process state: also run in a child after `fork()`."""
        self._lock = threading.Lock()
        self._core = ClientCore(
            buffer_bytes=self._buffer_bytes,
            batch_bytes=self._batch_bytes,
            linger_s=self._linger_s,
            on_done=_signal,
            clock=time.monotonic,
        )
        # True while the I/O thread will look at the buffer by itself (it is awake, or sleeps
        # with a timer): capture() then writes no wake-up byte.
        self._armed = False
        self._full_woken = False  # a full batch already woke the I/O thread
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._io: _IOLoop | None = None
        self._thread = threading.Thread(target=self._io_loop, name="captured-client", daemon=True)
        self._thread.start()

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
        with self._lock:
            core = self._core
            if not core.admit(rec, size):
                return False
            if self._armed:
                if self._full_woken or not core.batch_full():
                    return True
                self._full_woken = True
            self._armed = True
        self._wake()
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """True once every record `capture()` accepted before this call is in the daemon's spool
        or was dropped under a counted reason, and none of them was dropped by this client
        while it waited; False on timeout."""
        done = threading.Event()
        with self._lock:
            w = self._core.add_waiter(done)
        if w.done:
            return w.ok
        self._wake()
        return done.wait(timeout) and w.ok

    def stats(self) -> dict[str, Any]:
        """{"captured", "sent", "acknowledged", "buffered", "dropped": {reason: n}, "resent",
        "protocol"}: captured = acknowledged + buffered + sum(dropped)."""
        with self._lock:
            return self._core.stats()

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, then stop; what is still buffered is counted `closed`."""
        if self._wake_w < 0:
            return  # closed already
        if not self._closing:  # (an I/O thread that failed has set it: nothing to flush to)
            self.flush(timeout)
            with self._lock:
                self._closing = True
                self._core.closed = True
            self._wake()
        self._thread.join(timeout=CLOSE_GRACE_S + 1.0)
        if not self._thread.is_alive():
            # Only now, and only here: the I/O thread no longer reads the pipe, and a closed core
            # makes capture() and flush() return before they write to it. Closed while any
            # thread might still write, its number could be reused by a file of the application.
            with self._lock:
                fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                os.close(fd)
        _live_clients.discard(self)

    def __enter__(self) -> CaptureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # ---- I/O thread --------------------------------------------------------------------

    def _io_loop(self) -> None:
        try:
            self._io = _IOLoop(self)
            self._io.run()
        except Exception:  # never let the thread die silently
            log.exception("captured client I/O thread failed")
        finally:
            with self._lock:
                self._closing = True
                self._core.close()


class _IOLoop:
    """The client's background I/O: one socket, one poll loop; the core under the client's lock."""

    def __init__(self, client: CaptureClient) -> None:
        self.c = client
        self.core = client._core
        self.sock: socket.socket | None = None
        self.reader = frames.FrameReader()
        self.current: bytes | None = None  # the frame being written
        self.offset = 0  # bytes of `current` already written on this connection
        self.backoff = 0.05
        self.next_connect = 0.0
        self.armed_until = 0.0  # after sending, stay armed one linger more: no wake-up per batch
        self.errors_logged: set[str] = set()
        self.fallback_logged = False

    def run(self) -> None:
        c, core = self.c, self.core
        give_up_at: float | None = None
        while True:
            now = time.monotonic()
            batch = None
            with c._lock:
                closing = c._closing
                if closing and core.resolved() >= core.next_seq:
                    break  # everything acknowledged or counted
                if self.sock is not None and core.due(now):
                    batch = core.take(TAKE_BYTES)
                    c._full_woken = False
                    self.armed_until = now + core.linger_s
                elif not core.pending and now >= self.armed_until and not closing:
                    c._armed = False  # idle: the next capture() wakes this thread
                deadline = core.deadline() if core.write_at >= len(core.held) else None
                armed = c._armed
            if batch is not None:
                out = core.encode(batch)  # outside the lock: capture() goes on meanwhile
                with c._lock:
                    core.add_frames(out)
                if self.sock is not None:
                    self._write()  # the socket is writable as a rule: no poll(2) before it
                continue
            if self.sock is None and now >= self.next_connect:
                self._connect()
            rlist: list[int] = [c._wake_r]
            wlist: list[int] = []
            timeouts: list[float] = []
            if self.sock is not None:
                rlist.append(self.sock.fileno())
                if self.current is not None or self._next_write() is not None:
                    wlist.append(self.sock.fileno())
                if deadline is not None:
                    timeouts.append(deadline - now)
            else:
                timeouts.append(self.next_connect - now)
            if armed and not core.pending:
                timeouts.append(self.armed_until - now)
            if closing:
                # close() already waited for its flush; allow one last short wait, no more.
                if give_up_at is None:
                    give_up_at = now + CLOSE_GRACE_S
                if now >= give_up_at:
                    break
                timeouts.append(0.05)
            timeout = max(0.0, min(timeouts)) if timeouts else None
            r, w = _wait(rlist, wlist, timeout)
            if c._wake_r in r:
                with contextlib.suppress(BlockingIOError):
                    os.read(c._wake_r, 4096)
            if self.sock is not None and self.sock.fileno() in r:
                self._read()
            if self.sock is not None and self.sock.fileno() in w:
                self._write()
        self._disconnect(None)

    def _next_write(self) -> bytes | None:
        with self.c._lock:
            return self.core.next_write()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(1.0)
        self.c.socket_path = find_socket(self.c._socket_arg)
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
        self.current, self.offset = None, 0
        self.backoff = 0.05
        with self.c._lock:
            self.core.connection_made()

    def _write(self) -> None:
        assert self.sock is not None
        while True:
            data = self.current
            if data is None:
                data = self.current = self._next_write()
                if data is None:
                    return
            try:
                sent = self.sock.send(memoryview(data)[self.offset :])
            except BlockingIOError:
                return
            except OSError as exc:
                self._read()  # the daemon may have said why it closed (an ERROR): read it first
                self._disconnect(exc)
                return
            self.offset += sent
            if self.offset < len(data):
                return
            self.current, self.offset = None, 0
            with self.c._lock:
                self.core.written(data)

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
                with self.c._lock:
                    acknowledged = self.core.counters.acknowledged
                    error = self.core.on_frame(kind, payload)
                    progress = self.core.counters.acknowledged > acknowledged
                if error is not None:
                    self._on_error(error)
                    return
                if progress:
                    self.errors_logged.clear()  # a healthy exchange: report the next failure again
            self.reader.check()
        except (frames.ProtocolError, msgspec.DecodeError) as exc:
            self._disconnect(exc)

    def _on_error(self, message: str) -> None:
        """The daemon refused this connection (it closes it after the ERROR)."""
        with self.c._lock:
            fell_back = self.core.refused(message)
        if fell_back:
            if not self.fallback_logged:
                self.fallback_logged = True
                log.warning(
                    "the capture daemon at %s speaks protocol version 1 only: capturing at most once "
                    "(records in flight when it restarts can be lost; upgrade it for lossless restarts)",
                    self.c.socket_path,
                )
            self._disconnect(None)
            self.next_connect = 0.0  # at once, in protocol 1
            return
        self._log_once(f"error:{message}", "the capture daemon refused the connection: %s", message)
        self._disconnect(None, slow=True)

    def _disconnect(self, exc: BaseException | None, *, slow: bool = False) -> None:
        if self.sock is None:
            return
        self.sock.close()
        self.sock = None
        if exc is not None and not isinstance(exc, OSError | ConnectionError):
            log.warning("captured client: %s", exc)
        # A partly written frame goes out again whole on the next connection; protocol 2 sends
        # everything not acknowledged again (`ClientCore.connection_lost`).
        self.current, self.offset = None, 0
        with self.c._lock:
            self.core.connection_lost()
        delay = self.c._reconnect_max_s if slow else self.backoff
        self.next_connect = time.monotonic() + delay
        if exc is not None and getattr(exc, "errno", None) not in (None, errno.EPIPE, errno.ECONNRESET):
            self._log_once(f"io:{exc}", "connection to the capture daemon lost: %s", exc)

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
