"""The capture client's I/O-free core, shared by `CaptureClient` (a thread) and
`AsyncCaptureClient` (asyncio): admission, batching by size and time, sequence numbers,
acknowledgements, resend, flush bookkeeping and counters. The drivers only move bytes and
wait; so the two clients cannot drift apart.

Records flow through three places, all counted against `buffer_bytes`:

    pending  admitted by `capture()`, not yet encoded
    held     encoded into frames; kept until the daemon acknowledges them
    (gone)   acknowledged: written to the daemon's spool or dropped there under a counted reason

Protocol 2 (see `frames`): every record gets the next number of this client's session when it
is admitted; a frame carries the number of its first record. After every (re)connection the
driver writes HELLO and then every held frame from the first; the daemon skips what it had
taken already, so a restart or a crash of the daemon loses nothing and writes nothing twice,
as long as this process lives and its buffer did not overflow. A daemon that speaks only
protocol 1 refuses HELLO; the core then falls back to protocol 1 (at most once): a frame
written on a connection that breaks before the daemon acknowledged it cannot be sent again
(it may have been taken), and is counted as dropped `unconfirmed`.

Counters always add up: captured = acknowledged + buffered + sum(dropped), where buffered is
pending + held.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from captured.client.record import BUFFER_FULL, CLOSED, REJECTED, RecordTuple
from captured.wire import frames

log = logging.getLogger("captured.client")

#: A frame protocol 1 wrote on a connection that broke before an ACK covered it.
UNCONFIRMED = "unconfirmed"
#: How the ERROR of a daemon that speaks only protocol 1 ends.
_SPEAKS = re.compile(r"this peer speaks version (\d+)$")
_FRAME_REFUSALS = tuple(f"{reason}:" for reason in frames.FRAME_REFUSALS)

_encoder = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class Frame:
    """Encoded records kept until acknowledged. `data` is the whole frame in the protocol spoken."""

    first: int  # sequence number of the first record
    n: int
    size: int  # the records' buffer accounting
    payload: bytes  # the MessagePack array of the records
    data: bytes
    sent: bool = False  # written whole at least once


@dataclass(slots=True)
class Waiter:
    """One `flush()`: done once every record admitted before it is acknowledged or dropped."""

    target: int  # records numbered below this were admitted before the call
    ok: bool = True  # False once one of them was dropped by the client while it waited
    done: bool = False
    signal: Any = None  # the driver's: a threading.Event or an asyncio.Future


@dataclass(slots=True)
class Batch:
    """Records taken from `pending` for encoding (outside the driver's lock)."""

    first: int
    records: list[RecordTuple]
    sizes: list[int]


@dataclass(slots=True)
class Counters:
    captured: int = 0
    sent: int = 0
    resent: int = 0
    acknowledged: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


class ClientCore:
    """State of one capture client in one process; the driver serialises every call."""

    def __init__(
        self,
        *,
        buffer_bytes: int,
        batch_bytes: int,
        linger_s: float,
        on_done: Callable[[Waiter], None],
        clock: Callable[[], float],
    ) -> None:
        self.clock = clock
        #: Called once per waiter when it is resolved (after `done` and `ok` are set).
        self.on_done = on_done
        self.buffer_bytes = buffer_bytes
        self.batch_bytes = batch_bytes
        self.linger_s = linger_s
        self.session = os.urandom(16)
        self.version = frames.PROTOCOL_VERSION
        self.counters = Counters()
        self.pending: list[RecordTuple] = []
        self.sizes: list[int] = []
        self.pending_bytes = 0
        self.pending_since = 0.0  # when the oldest pending record was admitted (`clock`)
        self.held: deque[Frame] = deque()
        self.held_bytes = 0
        self.held_records = 0
        self.next_seq = 0  # the number the next admitted record gets
        self.waiters: list[Waiter] = []
        self.closed = False
        # The connection, as the driver reports it.
        self.control: deque[bytes] = deque()  # HELLO / FLUSH, written before the next held frame
        self.write_at = 0  # held[write_at] is the next frame to write on this connection
        self.flush_asked = 0  # the highest waiter target a FLUSH was written for, this connection
        self.v1_acked = 0  # protocol 1: records the daemon said it took on this connection

    # ---- the caller's side ---------------------------------------------------------------------

    def admit(self, rec: RecordTuple, size: int) -> bool:
        """Take one validated record into the buffer, or count why not (the hot path of
        `capture()`). An empty buffer takes any one record, so a maximum-size record (two 6 MiB
        bodies) fits whatever `buffer_bytes` is."""
        c = self.counters
        c.captured += 1
        if self.closed:
            _drop(c, CLOSED, 1)
            return False
        pending = self.pending
        if self.pending_bytes + self.held_bytes + size > self.buffer_bytes and (pending or self.held):
            _drop(c, BUFFER_FULL, 1)
            return False
        if not pending:
            self.pending_since = self.clock()  # the linger starts with the first record
        pending.append(rec)
        self.sizes.append(size)
        self.pending_bytes += size
        self.next_seq += 1
        return True

    def batch_full(self) -> bool:
        return self.pending_bytes >= self.batch_bytes

    def add_waiter(self, signal: Any) -> Waiter:
        """A flush of everything admitted so far; done at once if nothing is outstanding."""
        w = Waiter(self.next_seq, signal=signal)
        if self.closed:
            w.ok, w.done = False, True
        elif self.resolved() >= w.target:
            w.done = True
        if w.done:
            self.on_done(w)
        else:
            self.waiters.append(w)
        return w

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "captured": c.captured,
            "sent": c.sent,
            "acknowledged": c.acknowledged,
            "buffered": len(self.pending) + self.held_records,
            "dropped": dict(c.dropped),
            "resent": c.resent,
            "protocol": self.version,
        }

    # ---- batching ------------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether pending records should be encoded now: a batch is full, the linger passed, a
        flush waits, or the client is closing; and the connection has written what it holds."""
        if not self.pending or self.write_at < len(self.held):
            return False
        return (
            self.closed
            or bool(self.waiters)
            or self.pending_bytes >= self.batch_bytes
            or now >= self.pending_since + self.linger_s
        )

    def deadline(self) -> float | None:
        """When the linger of the pending records ends (None: nothing pending)."""
        return self.pending_since + self.linger_s if self.pending else None

    def take(self, limit_bytes: int) -> Batch:
        """Detach up to about `limit_bytes` of pending records (at least one) for encoding."""
        n = _chunk_length(self.sizes, limit_bytes)
        first = self.next_seq - len(self.pending)
        if n == len(self.pending):
            batch = Batch(first, self.pending, self.sizes)
            self.pending, self.sizes, self.pending_bytes = [], [], 0
        else:
            batch = Batch(first, self.pending[:n], self.sizes[:n])
            del self.pending[:n], self.sizes[:n]
            self.pending_bytes -= sum(batch.sizes)
        self.held_bytes += sum(batch.sizes)  # still buffered: counted from detach to ACK
        self.held_records += len(batch.records)
        return batch

    def encode(self, batch: Batch) -> list[Frame]:
        """Frames of at most about `batch_bytes` (or one record). Pure: call it outside the lock."""
        out: list[Frame] = []
        records, sizes = batch.records, batch.sizes
        start = acc = 0
        for i, size in enumerate(sizes):
            if acc and acc + size > self.batch_bytes:
                out.append(self._frame(batch.first + start, records[start:i], acc))
                start, acc = i, 0
            acc += size
        if start < len(records):
            out.append(self._frame(batch.first + start, records[start:], acc))
        return out

    def _frame(self, first: int, records: list[RecordTuple], size: int) -> Frame:
        payload = _encoder.encode(records)
        return Frame(first, len(records), size, payload, self._framed(first, payload))

    def _framed(self, first: int, payload: bytes) -> bytes:
        if self.version == 2:
            return frames.batch_frame_v2(first, payload)
        return frames.frame(frames.Kind.BATCH, payload)

    def add_frames(self, out: list[Frame]) -> None:
        """Keep the encoded frames until acknowledged (their bytes were counted by `take`)."""
        if self.version != frames.PROTOCOL_VERSION:  # fell back while they were being encoded
            for f in out:
                f.data = self._framed(f.first, f.payload)
        self.held.extend(out)

    # ---- the connection ------------------------------------------------------------------------

    def connection_made(self) -> None:
        self.control.clear()
        self.flush_asked = 0
        self.v1_acked = 0
        # Protocol 2: everything held goes again, the daemon skips what it took. Protocol 1:
        # only frames never written whole are held here (`connection_lost` dropped the others).
        self.write_at = 0
        if self.version == 2:
            self.control.append(frames.encode_frame(frames.Kind.HELLO, (self.session, self.buffer_bytes), 2))

    def next_write(self) -> bytes | None:
        """The next frame to write on this connection, or None when there is nothing to write."""
        if self.control:
            return self.control[0]
        if self.write_at < len(self.held):
            return self.held[self.write_at].data
        if self.waiters and not self.pending:
            target = self.waiters[-1].target
            if target > self.flush_asked:
                self.flush_asked = target
                self.control.append(frames.encode_frame(frames.Kind.FLUSH, (target,), self.version))
                return self.control[0]
        return None

    def written(self, data: bytes) -> None:
        """`data`, which `next_write` returned, went to the kernel whole. (An ACK may have
        covered that frame while it was being written: then there is nothing to advance.)"""
        if self.control and self.control[0] is data:
            self.control.popleft()
            return
        if self.write_at >= len(self.held) or self.held[self.write_at].data is not data:
            return
        f = self.held[self.write_at]
        self.write_at += 1
        if f.sent:
            self.counters.resent += f.n
        else:
            f.sent = True
            self.counters.sent += f.n

    def connection_lost(self) -> None:
        """Protocol 2 keeps everything held for the next connection. Protocol 1 cannot: frames
        written whole and not acknowledged may have been taken, so they are dropped, counted."""
        self.control.clear()
        if self.version == 1 and self.write_at:
            self._drop_front(self.write_at, UNCONFIRMED)
        self.write_at = 0

    def on_frame(self, kind: int, payload: memoryview) -> str | None:
        """A frame from the daemon. Returns the text of an ERROR (the daemon closes the
        connection after it), else None. Raises msgspec.DecodeError on a bad ACK."""
        if kind == frames.Kind.ACK:
            ack = frames.ack_decoder.decode(payload)
            if self.version == 2:
                self._acked_through(ack.records)
            else:
                self._v1_acked(ack.records)
            return None
        if kind == frames.Kind.ERROR:
            return bytes(payload).decode("utf-8", "replace")
        return None

    def refused(self, message: str) -> bool:
        """The daemon sent ERROR. True when it speaks protocol 1 only: the core now speaks that
        (reconnect at once); otherwise the frame a refusal was about is dropped, counted."""
        m = _SPEAKS.search(message)
        if self.version == 2 and m is not None and int(m.group(1)) < 2:
            # It refused HELLO, the first frame: nothing written after it was taken.
            self.version = 1
            self.write_at = 0
            for f in self.held:
                f.data = self._framed(f.first, f.payload)
            return True
        if self.version == 2:
            if message.startswith(_FRAME_REFUSALS) and self.held:
                # Its ACK just before covered every frame before the refused one: that is first.
                self._drop_front(1, REJECTED)
        elif "exceeds the maximum" in message and self.write_at < len(self.held):
            # Protocol 1: the frame refused by its header is the one being written.
            self._drop_at(self.write_at, REJECTED)
        return False

    # ---- acknowledgements ----------------------------------------------------------------------

    def _acked_through(self, next_seq: int) -> None:
        """Protocol 2: every record numbered below `next_seq` was taken by the daemon."""
        popped = 0
        held = self.held
        while held and held[0].first + held[0].n <= next_seq:
            f = held.popleft()
            self._release(f)
            self.counters.acknowledged += f.n
            popped += 1
        self.write_at = max(0, self.write_at - popped)
        self._resolve()

    def _v1_acked(self, records: int) -> None:
        """Protocol 1: the daemon took `records` records from this connection so far."""
        new = records - self.v1_acked
        self.v1_acked = records
        popped = 0
        held = self.held
        while held and popped < self.write_at and held[0].n <= new:
            f = held.popleft()
            new -= f.n
            self._release(f)
            self.counters.acknowledged += f.n
            popped += 1
        self.v1_acked -= new  # a frame partly acknowledged stays; its rest counts with the next ACK
        self.write_at -= popped
        self._resolve()

    def _release(self, f: Frame) -> None:
        self.held_bytes -= f.size
        self.held_records -= f.n

    def _drop_front(self, count: int, reason: str) -> None:
        """Drop the first `count` held frames: counted, and no flush waiting on them is True."""
        lowest = None
        for _ in range(min(count, len(self.held))):
            f = self.held.popleft()
            lowest = f.first if lowest is None else lowest
            self._release(f)
            _drop(self.counters, reason, f.n)
        if lowest is not None:
            self.write_at = max(0, self.write_at - count)
            for w in self.waiters:
                if w.target > lowest:
                    w.ok = False
            self._resolve()

    def _drop_at(self, index: int, reason: str) -> None:
        f = self.held[index]
        del self.held[index]
        self._release(f)
        _drop(self.counters, reason, f.n)
        for w in self.waiters:
            if w.target > f.first:
                w.ok = False
        self._resolve()

    def resolved(self) -> int:
        """Every record numbered below this is acknowledged or dropped (counted)."""
        if self.held:
            return self.held[0].first
        return self.next_seq - len(self.pending)

    def _resolve(self) -> None:
        through = self.resolved()
        if self.waiters and self.waiters[0].target <= through:
            keep = []
            for w in self.waiters:
                if w.target <= through:
                    w.done = True
                    self.on_done(w)
                else:
                    keep.append(w)
            self.waiters = keep

    # ---- the end -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: every record still buffered is dropped (`closed`); open waiters answer False."""
        self.closed = True
        n = len(self.pending) + self.held_records
        _drop(self.counters, CLOSED, n)
        self.pending, self.sizes, self.pending_bytes = [], [], 0
        self.held.clear()
        self.held_bytes = self.held_records = 0
        self.write_at = 0
        waiting, self.waiters = self.waiters, []
        for w in waiting:
            w.ok, w.done = False, True
            self.on_done(w)


def _drop(c: Counters, reason: str, n: int) -> None:
    if n:
        c.dropped[reason] = c.dropped.get(reason, 0) + n


def _chunk_length(sizes: list[int], limit: int) -> int:
    """How many leading records fit in `limit` bytes (at least one)."""
    acc = 0
    for i, size in enumerate(sizes):
        acc += size
        if acc > limit:
            return max(i, 1)
    return len(sizes)
