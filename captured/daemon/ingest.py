"""The Unix socket server: connections, frame parsing, and handing batches to the pipeline.

Each connection is an `asyncio.BufferedProtocol` whose reads land in place (`frames.FrameBuffer`).
Frames are processed synchronously in `buffer_updated`, in order, so when a FLUSH frame is parsed
every earlier BATCH of that connection has already been written to the spool (or dropped under a
counted reason). After the frames of a read, one journal entry records what they did
(`ledger`); an ACK goes out only after the entry that holds what it reports. While the pipeline
works, the loop does not read: the kernel's socket buffer and then the client's own bounded
buffer absorb bursts (back-pressure, never unbounded growth here).

A connection that starts with HELLO speaks protocol 2: its BATCH frames carry sequence numbers
of the client's session; records the session had taken already (a frame resent after a
reconnect) are skipped, counted `resent`. It is acknowledged by time (`frames.ACK_INTERVAL_S`)
or after a quarter of the client's window of new frames, in reply to FLUSH, and once more
before the daemon closes it. Any other connection speaks protocol 1 (ACK only in reply to FLUSH).

Memory per connection is bounded by one partial frame (`max_frame_bytes`) plus one read, held
only while a frame is under way, and by `MAX_WRITE_BUFFER` of replies a client has not read;
all connections together may hold at most `buffer_budget_bytes` of unfinished frames (the
connection that crosses it is closed, `memory_limit`). At most `max_connections` are served at
once; at the cap, the connection idle the longest (for a second at least) makes room for a new
one (`idle_evicted`), else the new one is refused (`too_many_connections`). A connection whose
frame does not arrive whole within `frame_timeout_s` of its first byte is closed (`stalled_frame`).

Access: the socket file's mode and group decide who may connect; when allow-lists are set, each
new connection's peer credentials (SO_PEERCRED: uid, primary gid, and the supplementary groups
of that process as /proc shows them) must match one, or the connection is refused
(`peer_refused`) before anything it sent is read. root and the daemon's own user always pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import msgspec

from captured.daemon.ledger import Ledger, Session
from captured.daemon.peers import peer_credentials
from captured.daemon.pipeline import Pipeline
from captured.service.logs import RateLimited
from captured.wire import frames

log = logging.getLogger("captured.ingest")

#: At the connection cap, a connection idle this long may be closed to let a new one in.
EVICT_IDLE_S = 1.0
#: Replies (ACK, STATUS_REPLY) a peer may leave unread before it is disconnected.
MAX_WRITE_BUFFER = 1 << 20
#: Protocol 2: acknowledge after this many bytes of new frames when HELLO named no window.
DEFAULT_ACK_BYTES = 1 << 20


#: Every reason the daemon closes a connection for: protocol errors, and its own limits.
CLOSE_REASONS = (
    "bad_header",
    "unsupported_version",
    "unknown_kind",
    "unexpected_kind",
    "frame_too_large",
    "bad_payload",
    "internal_error",
    "stalled_frame",
    "slow_reader",
    "memory_limit",
    "too_many_connections",
    "idle_evicted",
    "peer_refused",
)


class IngestCounters:
    __slots__ = ("closed", "connections", "connections_total")

    def __init__(self) -> None:
        self.connections = 0
        self.connections_total = 0
        # Connections the daemon closed, by reason (`CLOSE_REASONS`).
        self.closed: dict[str, int] = {}

    def statistics(self) -> IngestStats:
        return IngestStats(
            connections=self.connections,
            connections_total=self.connections_total,
            connections_closed=dict(self.closed),
        )


class IngestStats(msgspec.Struct, frozen=True):
    connections: int
    connections_total: int
    #: Connections the daemon closed, by reason (`CLOSE_REASONS`): a client that broke the
    #: protocol, or the daemon's own limits (`too_many_connections`, `idle_evicted`,
    #: `peer_refused`, `memory_limit`, ...). Called `protocol_errors` before 0.2.0.
    connections_closed: dict[str, int]


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.reader = frames.FrameBuffer(server.max_frame_bytes, server.scratch, server.spare)
        self.transport: asyncio.Transport | None = None
        self.records = 0
        self.last_data = time.monotonic()
        self.refused = False
        self.frame_started: float | None = None
        self.accounted = 0  # this connection's share of `IngestServer.buffered_total`
        # Protocol: 0 until the first frame, then 1, or 2 after HELLO.
        self.version = 0
        self.session: Session | None = None
        self.acked = 0  # protocol 2: the `next` the last ACK carried
        self.unacked_bytes = 0  # protocol 2: bytes of BATCH frames since the last ACK
        self.ack_bytes = DEFAULT_ACK_BYTES
        self.ack_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        server.connections.add(self)
        server.stats.connections += 1
        server.stats.connections_total += 1
        if len(server.connections) > server.max_connections and not server.evict_idle(self):
            self.fail("too_many_connections", f"the daemon serves at most {server.max_connections} clients")
        elif server.allowed is not None:
            creds = peer_credentials(self.transport)
            if creds is None or not server.allowed(*creds):
                who = "unknown" if creds is None else f"uid {creds[0]}, gids {sorted(creds[1])}"
                self.fail("peer_refused", f"this peer ({who}) is not allowed to send captures")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.stats.connections -= 1
        self.server.buffered_total -= self.accounted
        self.accounted = 0
        self.reader = frames.FrameBuffer(0, self.server.scratch, [])  # drop the partial frame now
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.refused:
            return memoryview(self.server.scratch)  # refused: what it sends is read and ignored
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.refused:
            return  # refused in connection_made: nothing it sends is read
        now = self.last_data = time.monotonic()
        try:
            got = self.reader.buffer_updated(nbytes)
            # A frame must arrive whole within frame_timeout_s of its first byte (`sweep`).
            if not self.reader.buffered:
                self.frame_started = None
            elif got or self.frame_started is None:
                self.frame_started = now
            server = self.server
            batches = False
            for kind, payload in got:
                if kind == frames.Kind.BATCH:
                    if self.version == 2:
                        self._batch_v2(payload)
                    else:
                        self.version = 1
                        self.records += server.pipeline.process(payload)
                    batches = True
                elif kind == frames.Kind.FLUSH:
                    seq = frames.flush_decoder.decode(payload).seq
                    if not server.ledger.commit():
                        continue  # the journal cannot be written: nothing can be confirmed
                    if self.version == 2:
                        self._ack(seq)
                    else:
                        self._reply(frames.encode_frame(frames.Kind.ACK, (seq, self.records)))
                elif kind == frames.Kind.HELLO:
                    self._hello(payload)
                elif kind == frames.Kind.STATUS:
                    doc = server.status()
                    self._reply(frames.encode_frame(frames.Kind.STATUS_REPLY, doc, self.version or 1))
                else:
                    raise frames.ProtocolError(
                        reason="unexpected_kind", message=f"a client may not send frame kind {kind}"
                    )
            if batches:
                server.ledger.commit()
                if self.version == 2:
                    self._ack_soon()
            self.reader.check()
            self._account()
        except frames.ProtocolError as exc:
            self.fail(exc.reason, str(exc))
        except (msgspec.DecodeError, RecursionError) as exc:
            self.fail("bad_payload", f"undecodable frame payload: {exc}")
        except Exception as exc:  # a backstop: whatever a client sends must not escape unhandled
            log.exception("unexpected error on a client connection")
            self.fail("internal_error", f"the daemon could not process a frame: {exc}")

    def _hello(self, payload: memoryview) -> None:
        if self.version:
            raise frames.ProtocolError(
                reason="unexpected_kind", message="HELLO may only be a connection's first frame"
            )
        hello = frames.hello_decoder.decode(payload)
        self.version = 2
        self.session = self.server.ledger.session(hello.session)
        if hello.window:
            self.ack_bytes = max(4096, hello.window // 4)
        self._ack(0)  # where the session stands: the client sends again from there

    def _batch_v2(self, payload: memoryview) -> None:
        session = self.session
        assert session is not None
        if len(payload) < frames.BATCH_SEQ.size:
            raise frames.ProtocolError(
                reason="bad_payload", message="a protocol 2 BATCH starts with a sequence number"
            )
        (first,) = frames.BATCH_SEQ.unpack_from(payload)
        skip = session.taken - first if first < session.taken else 0
        n = self.server.pipeline.process(payload[frames.BATCH_SEQ.size :], skip)
        self.server.ledger.took(session, first + n)
        self.records += n
        self.unacked_bytes += len(payload)

    def _ack_soon(self) -> None:
        """Acknowledge now if a quarter of the client's window arrived since the last ACK, else
        within ACK_INTERVAL_S: by time, not per frame, so a quiet client costs few wake-ups."""
        session = self.session
        if session is None or session.committed <= self.acked:
            return
        if self.unacked_bytes >= self.ack_bytes:
            self._ack(0)
        elif self.ack_timer is None:
            loop = asyncio.get_running_loop()
            self.ack_timer = loop.call_later(frames.ACK_INTERVAL_S, self._on_ack_timer)

    def _on_ack_timer(self) -> None:
        self.ack_timer = None
        if self.refused or self.transport is None or self.transport.is_closing():
            return
        if self.server.ledger.commit():  # retries an entry that could not be written before
            self._ack(0)
        else:
            self.ack_timer = asyncio.get_running_loop().call_later(frames.ACK_INTERVAL_S, self._on_ack_timer)

    def _ack(self, seq: int) -> None:
        """Protocol 2: tell the client the first record number its session has not taken."""
        session = self.session
        assert session is not None
        self.acked = session.committed
        self.unacked_bytes = 0
        self._reply(frames.encode_frame(frames.Kind.ACK, (seq, session.committed), 2))

    def goodbye(self) -> None:
        """Before the daemon closes this connection: say exactly what was taken (protocol 2)."""
        transport = self.transport
        if self.version != 2 or self.refused or transport is None or transport.is_closing():
            return
        if self.server.ledger.commit():
            self._ack(0)

    def _account(self) -> None:
        """Keep the daemon-wide total of partial-frame bytes within `buffer_budget_bytes`."""
        server = self.server
        held = self.reader.buffered
        server.buffered_total += held - self.accounted
        self.accounted = held
        if server.buffered_total > server.buffer_budget_bytes and held:
            self.fail(
                "memory_limit",
                f"clients hold more than {server.buffer_budget_bytes} bytes of unfinished frames",
            )

    def _reply(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.fail("slow_reader", "the client does not read the daemon's replies")
            return
        self.transport.write(data)

    def fail(self, reason: str, message: str) -> None:
        """Refuse this connection: say why (if the peer still listens), count it, close it."""
        if self.refused:
            return
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() <= MAX_WRITE_BUFFER:
            self.goodbye()  # protocol 2: what was taken, so the client knows which frame was refused
        self.refused = True
        stats = self.server.stats
        stats.closed[reason] = stats.closed.get(reason, 0) + 1
        self.server.warn.warning(reason, "closing a client connection (%s): %s", reason, message)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames.error_frame(f"{reason}: {message}"))
            self.transport.close()


class IngestServer:
    """Owns the listening socket and the set of live connections."""

    def __init__(
        self,
        pipeline: Pipeline,
        ledger: Ledger,
        *,
        max_frame_bytes: int,
        status: Callable[[], object],
        max_connections: int = 1024,
        frame_timeout_s: float = 30.0,
        buffer_budget_bytes: int = 64 * 1024 * 1024,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
    ) -> None:
        self.pipeline = pipeline
        self.ledger = ledger
        self.max_frame_bytes = max_frame_bytes
        # Where every connection's reads land while it has no frame under way, and the buffers
        # of finished frames kept for the next partial one (`frames.FrameBuffer`).
        self.scratch = bytearray(frames.READ_SIZE)
        self.spare: list[bytearray] = []
        self.status = status
        self.max_connections = max_connections
        self.frame_timeout_s = frame_timeout_s
        self.buffer_budget_bytes = max(buffer_budget_bytes, max_frame_bytes)
        self.buffered_total = 0  # bytes of unfinished frames, all connections
        uids, gids = frozenset(allowed_uids), frozenset(allowed_gids)
        self.allowed: Callable[[int, frozenset[int]], bool] | None = None
        if uids or gids:
            uids |= {0, os.getuid()}  # root and the daemon's own user (`captured status`)
            self.allowed = lambda uid, groups: uid in uids or not gids.isdisjoint(groups)
        self.connections: set[Connection] = set()
        self.stats = IngestCounters()
        self.warn = RateLimited(log)
        self._server: asyncio.Server | None = None

    async def start(self, *, path: str | None = None, sock: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Connection(self), path=path, sock=sock, backlog=1024, start_serving=True
        )

    def evict_idle(self, newcomer: Connection) -> bool:
        """At the connection cap: close the connection idle the longest, if it has been idle for
        `EVICT_IDLE_S` and holds no unfinished frame, to make room for `newcomer`. Connections
        that only sit open cannot lock active clients out; a `CaptureClient` evicted while idle
        just connects again when it next sends."""
        candidates = (
            c for c in self.connections if c is not newcomer and not c.refused and not c.reader.buffered
        )
        oldest = min(candidates, key=lambda c: c.last_data, default=None)
        if oldest is None or time.monotonic() - oldest.last_data < EVICT_IDLE_S:
            return False
        oldest.fail("idle_evicted", "closed to make room: the daemon is at its connection limit")
        return True

    def sweep(self) -> None:
        """Close connections whose current frame began more than `frame_timeout_s` ago (the
        timer): a client that stalls mid-frame, or trickles a byte a second, holds a buffer."""
        cutoff = time.monotonic() - self.frame_timeout_s
        for c in list(self.connections):
            if c.frame_started is not None and c.frame_started < cutoff:
                c.fail("stalled_frame", f"a frame did not arrive whole within {self.frame_timeout_s:g} s")

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
            c.goodbye()
            if c.transport is not None:
                c.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
