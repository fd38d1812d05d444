"""The Unix socket server: connections, frame parsing, and handing batches to the pipeline.

Each connection is an `asyncio.Protocol`. Frames are processed synchronously in
`data_received`, in order, so when a FLUSH frame is parsed every earlier BATCH of that connection
has already been written to the spool (or dropped under a counted reason) and the ACK can go out
at once. While the pipeline works, the loop does not read: the kernel's socket buffer and then
the client's own bounded buffer absorb bursts (back-pressure, never unbounded growth here).

Memory per connection is bounded by one partial frame (`max_frame_bytes`) plus one read, and by
`MAX_WRITE_BUFFER` of replies a client has not read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

from . import frames
from .logs import RateLimited
from .pipeline import Pipeline

log = logging.getLogger("captured.ingest")

#: Replies (ACK, STATUS_REPLY) a peer may leave unread before it is disconnected.
MAX_WRITE_BUFFER = 1 << 20


class IngestStats:
    __slots__ = ("closed", "connections", "connections_total")

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        # Connections closed by the daemon for breaking the protocol, by reason.
        self.closed: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "connections_total": self.connections_total,
            "protocol_errors": dict(self.closed),
        }


class Connection(asyncio.Protocol):
    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.reader = frames.FrameReader(server.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.records = 0
        self.last_data = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections.add(self)
        self.server.stats.connections += 1
        self.server.stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.stats.connections -= 1

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        try:
            for kind, payload in self.reader.feed(data):
                if kind == frames.Kind.BATCH:
                    self.records += self.server.pipeline.process(payload)
                elif kind == frames.Kind.FLUSH:
                    seq = frames.flush_decoder.decode(payload).seq
                    self._reply(frames.encode_frame(frames.Kind.ACK, (seq, self.records)))
                elif kind == frames.Kind.STATUS:
                    self._reply(frames.encode_frame(frames.Kind.STATUS_REPLY, self.server.status()))
                else:
                    raise frames.ProtocolError("unexpected_kind", f"a client may not send frame kind {kind}")
            self.reader.check()
        except frames.ProtocolError as exc:
            self.fail(exc.reason, str(exc))
        except (msgspec.DecodeError, RecursionError) as exc:
            self.fail("bad_payload", f"undecodable frame payload: {exc}")
        except Exception as exc:  # a backstop: whatever a client sends must not escape unhandled
            log.exception("unexpected error on a client connection")
            self.fail("internal_error", f"the daemon could not process a frame: {exc}")

    def _reply(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.fail("slow_reader", "the client does not read the daemon's replies")
            return
        self.transport.write(data)

    def fail(self, reason: str, message: str) -> None:
        """Refuse this connection: say why (if the peer still listens), count it, close it."""
        stats = self.server.stats
        stats.closed[reason] = stats.closed.get(reason, 0) + 1
        self.server.warn.warning(reason, "closing a client connection (%s): %s", reason, message)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames.error_frame(message))
            self.transport.close()


class IngestServer:
    """Owns the listening socket and the set of live connections."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_frame_bytes: int,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.pipeline = pipeline
        self.max_frame_bytes = max_frame_bytes
        self.status = status
        self.connections: set[Connection] = set()
        self.stats = IngestStats()
        self.warn = RateLimited(log)
        self._server: asyncio.Server | None = None

    async def start(self, *, path: str | None = None, sock: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Connection(self), path=path, sock=sock, backlog=1024, start_serving=True
        )

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout_s: float, quiet_s: float = 0.1) -> None:
        """Keep reading what connected clients already sent, then close every connection.

        Ends when no connection has delivered data for `quiet_s` since the drain began (so a
        connection idle before the stop still gets `quiet_s` to deliver what it just sent), or
        after `timeout_s`.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        while self.connections and time.monotonic() < deadline:
            now = time.monotonic()
            if all(now - max(c.last_data, start) >= quiet_s for c in self.connections):
                break
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
