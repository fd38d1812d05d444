"""The client's I/O-free core alone: admission, frames, acknowledgements, resend, fallback, counters."""

from __future__ import annotations

from typing import Any

import pytest

from captured.client.core import UNCONFIRMED, ClientCore, Waiter
from captured.client.record import prepare_record
from captured.wire import frames


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw: Any) -> tuple[ClientCore, Clock, list[Waiter]]:
    clock = Clock()
    done: list[Waiter] = []
    opts: dict[str, Any] = dict(buffer_bytes=1 << 20, batch_bytes=4096, linger_s=0.02)
    opts.update(kw)
    return ClientCore(on_done=done.append, clock=clock, **opts), clock, done


def rec(i: int, body: int = 100) -> tuple[tuple[Any, ...], int]:
    return prepare_record(b"x" * body, b"0", "text/csv", "text/csv", str(i), None, None, None, None, 1 << 20)


def adds_up(core: ClientCore) -> bool:
    s = core.stats()
    return bool(s["captured"] == s["acknowledged"] + s["buffered"] + sum(s["dropped"].values()))


def pump(core: ClientCore) -> list[bytes]:
    """Encode what is due and 'write' everything the core wants written."""
    out = []
    while core.pending and core.due(core.clock() + 1):
        core.add_frames(core.encode(core.take(1 << 20)))
    while (data := core.next_write()) is not None:
        out.append(data)
        core.written(data)
    return out


def ack(core: ClientCore, next_seq: int, seq: int = 0) -> None:
    core.on_frame(frames.Kind.ACK, memoryview(frames._encoder.encode((seq, next_seq))))


def test_records_wait_for_the_linger_or_a_full_batch() -> None:
    core, clock, _ = make()
    core.connection_made()
    assert core.admit(*rec(0))
    assert not core.due(clock.now) and core.deadline() == pytest.approx(100.02)
    clock.now += 0.021
    assert core.due(clock.now)
    core2, clock2, _ = make()
    core2.connection_made()
    while not core2.batch_full():
        core2.admit(*rec(1))
    assert core2.due(clock2.now)  # a full batch goes at once


def test_held_records_count_against_the_buffer_until_acknowledged() -> None:
    core, _, _ = make(buffer_bytes=2000)
    core.connection_made()
    n = 0
    while core.admit(*rec(n)):
        n += 1
    pump(core)
    assert core.pending_bytes == 0 and core.held_bytes > 0
    assert not core.admit(*rec(99))  # still full: the records are held for the daemon
    assert core.stats()["dropped"] == {"buffer_full": 2} and adds_up(core)
    ack(core, n)
    assert core.held_bytes == 0 and core.admit(*rec(100)) and adds_up(core)


def test_a_reconnect_sends_hello_then_everything_held_again() -> None:
    core, _, done = make()
    core.connection_made()
    for i in range(30):
        core.admit(*rec(i))
    first = pump(core)
    assert first[0][3] == frames.Kind.HELLO and first[0][2] == 2
    batches = [f for f in first if f[3] == frames.Kind.BATCH]
    assert len(batches) > 1
    w = core.add_waiter(object())
    ack(core, 10)  # the daemon took the first frames only, then died
    core.connection_lost()
    assert not w.done and adds_up(core)
    still_held = [f.data for f in core.held]
    assert still_held == batches[len(batches) - len(still_held) :]
    assert frames.BATCH_SEQ.unpack_from(still_held[0], frames.HEADER_SIZE)[0] < 10  # not fully taken
    core.connection_made()
    again = pump(core)
    assert again[0][3] == frames.Kind.HELLO
    assert [f for f in again if f[3] == frames.Kind.BATCH] == still_held  # the same bytes, again
    assert core.stats()["resent"] == sum(f.n for f in core.held)
    assert again[-1][3] == frames.Kind.FLUSH  # the waiting flush asks again on the new connection
    ack(core, 30)
    assert w.done and w.ok and done == [w]
    assert core.stats()["acknowledged"] == 30 and core.stats()["buffered"] == 0 and adds_up(core)


def test_an_ack_that_covers_a_frame_while_it_is_written_is_harmless() -> None:
    core, _, _ = make()
    core.connection_made()
    for i in range(5):
        core.admit(*rec(i))
    core.add_frames(core.encode(core.take(1 << 20)))
    hello = core.next_write()
    assert hello is not None
    core.written(hello)
    data = core.next_write()
    assert data is not None
    ack(core, 5)  # the daemon had it from an earlier connection
    core.written(data)  # finishing the write advances nothing
    assert core.write_at == 0 and not core.held and core.next_write() is None


def test_an_old_daemon_makes_the_core_speak_protocol_1() -> None:
    core, _, _ = make()
    core.connection_made()
    for i in range(3):
        core.admit(*rec(i))
    pump(core)
    assert core.refused("protocol version 2 is not supported; this peer speaks version 1")
    core.connection_lost()
    assert core.stats()["dropped"] == {}  # the old daemon took nothing after refusing HELLO
    core.connection_made()
    out = pump(core)
    assert [d[2] for d in out] == [1] * len(out) and out[0][3] == frames.Kind.BATCH
    assert core.stats()["protocol"] == 1


def test_protocol_1_counts_what_a_broken_connection_may_have_lost() -> None:
    core, _, _ = make()
    core.version = 1
    core.connection_made()
    for i in range(3):
        core.admit(*rec(i))
    w = core.add_waiter(object())
    pump(core)
    core.connection_lost()
    assert w.done and not w.ok
    assert core.stats()["dropped"] == {UNCONFIRMED: 3} and adds_up(core)


def test_a_refused_frame_is_dropped_and_its_waiters_answer_false() -> None:
    core, _, _ = make(batch_bytes=300)
    core.connection_made()
    for i in range(4):
        core.admit(*rec(i))
    w = core.add_waiter(object())
    pump(core)
    ack(core, 2)  # the ACK the daemon sends before its ERROR
    assert not core.refused("frame_too_large: frame of 1 bytes exceeds the maximum 0")
    assert core.stats()["dropped"] == {"rejected_by_daemon": 1}
    ack(core, 4)
    assert w.done and not w.ok and adds_up(core)


def test_close_drops_what_is_held_and_answers_waiters() -> None:
    core, _, done = make()
    core.connection_made()
    for i in range(3):
        core.admit(*rec(i))
    w = core.add_waiter(object())
    core.close()
    assert w.done and not w.ok and done == [w]
    assert core.stats()["dropped"] == {"closed": 3} and adds_up(core)
    assert not core.admit(*rec(9)) and core.stats()["dropped"]["closed"] == 4


def test_a_flush_with_nothing_outstanding_is_done_at_once() -> None:
    core, _, done = make()
    w = core.add_waiter(object())
    assert w.done and w.ok and done == [w]
