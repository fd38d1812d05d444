"""Nothing accepted is lost, nothing is written twice: protocol 2 across restarts and crashes.

Each test tries the guarantee at its weakest moment: a daemon stopped (SIGTERM) or killed
(SIGKILL) while a client streams, a record written into the socket of a frozen daemon that is
then killed, a frame resent after the daemon had written it, data in the spool whose journal
entry never made it. The counters are checked on both sides.

Those tests need a daemon process to stop, kill, freeze and start again. What needs no process
boundary (acknowledging by time, protocol 1) runs the daemon in the test's own event loop
(`captured.testing.inprocess`), with blocking client code in threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from captured import CaptureClient
from captured.client.record import prepare_record
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.inprocess import (
    FakeClock,
    delivered_files,
    eventually,
    run_daemon,
    status_doc,
    write_config,
)
from captured.wire import frames


def csv_pair(i: int) -> dict[str, Any]:
    return dict(
        request_body=f"{i},0,159.3,66\n".encode(),
        response_body=b"0.5",
        request_content_type="text/csv",
        response_content_type="text/csv",
        inference_id=str(i),
    )


def delivered_ids(d: DaemonProcess | Path) -> list[int]:
    """Every delivered record's inference id (of a subprocess daemon, or of an in-process one on
    `write_config(root)`); asserts that every line is whole."""
    ids = []
    for path in d.delivered_files() if isinstance(d, DaemonProcess) else delivered_files(d):
        for raw in path.read_bytes().splitlines(keepends=True):
            assert raw.endswith(b"\n"), f"a torn line in {path}"
            ids.append(int(json.loads(raw)["eventMetadata"]["inferenceId"]))
    return ids


def adds_up(stats: dict[str, Any]) -> bool:
    return bool(
        stats["captured"] == stats["acknowledged"] + stats["buffered"] + sum(stats["dropped"].values())
    )


class Streamer:
    """A model server capturing at a modest rate from its own thread; remembers what was accepted."""

    def __init__(self, d: DaemonProcess, per_ms: int = 2) -> None:
        self.client = CaptureClient(d.socket_path, reconnect_max_s=0.1, buffer_bytes=64 << 20)
        self.accepted: list[int] = []
        self.samples: list[dict[str, Any]] = []
        self.per_ms = per_ms
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            for _ in range(self.per_ms):
                if self.client.capture(**csv_pair(i)):
                    self.accepted.append(i)
                i += 1
            if i % 500 == 0:
                self.samples.append(self.client.stats())
            time.sleep(0.001)

    def __enter__(self) -> Streamer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restarts_under_a_streaming_client_lose_nothing_and_duplicate_nothing(
    daemon_factory: Any, sig: int
) -> None:
    """Five times, at a random moment while a client captures (about 2,000 records/s), the daemon
    is stopped (SIGTERM: what `systemctl restart` does) or killed (SIGKILL) and started again.
    In the end the client's flush is True, every record capture() accepted is delivered exactly
    once, no line is torn, the client's counters add up at every sample, and the daemon counted
    the records it skipped as already taken (`resent`) apart from what it received."""
    rng = random.Random(11 if sig == signal.SIGTERM else 13)
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 0.3\n")
    d.start()
    with Streamer(d) as s:
        for _ in range(5):
            time.sleep(rng.uniform(0.2, 0.7))
            assert d.stop(sig) in (0, -signal.SIGKILL)
            d.start()
        time.sleep(0.3)
    assert s.client.flush(timeout=30), s.client.stats()
    stats = s.client.stats()
    s.client.close()
    assert stats["dropped"] == {} and stats["buffered"] == 0
    assert stats["captured"] == stats["acknowledged"] == len(s.accepted) > 1000
    assert all(adds_up(x) for x in s.samples) and len(s.samples) > 5
    counters = d.status()["counters"]
    assert counters["received"] == counters["written"] + sum(counters["dropped"].values())
    assert d.stop() == 0
    ids = delivered_ids(d)
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert sorted(ids) == s.accepted, "an accepted record was lost"
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_a_record_written_into_a_frozen_daemon_that_is_killed_is_delivered(daemon: DaemonProcess) -> None:
    """The thread client: the daemon frozen (SIGSTOP), record A captured and written into its
    socket by the I/O thread, the daemon killed (SIGKILL) before it read A and started again,
    record B captured: flush() is True only because A was sent again, and A and B arrive once."""
    client = CaptureClient(daemon.socket_path, reconnect_max_s=0.1)
    assert client.capture(**csv_pair(0)) and client.flush()
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    assert client.capture(**csv_pair(1))  # A
    wait_for(lambda: client.stats()["sent"] == 2)  # written into the frozen daemon's socket
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert client.capture(**csv_pair(2))  # B
    assert client.flush(timeout=15)
    stats = client.stats()
    client.close()
    assert stats["acknowledged"] == 3 and stats["resent"] >= 1 and stats["dropped"] == {}
    daemon.stop()
    assert sorted(delivered_ids(daemon)) == [0, 1, 2]


def test_records_are_acknowledged_by_time_without_flush(short_tmp: Path) -> None:
    """A client that never calls flush() still gets its records acknowledged (the daemon does so
    within `frames.ACK_INTERVAL_S` of taking them), so its buffer does not fill with held records."""
    cfg = write_config(short_tmp)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            client = CaptureClient(cfg.socket_path)
            try:
                for i in range(100):
                    assert client.capture(**csv_pair(i))
                await eventually(lambda: client.stats()["acknowledged"] == 100, timeout=10)
                assert client.stats()["buffered"] == 0
            finally:
                await asyncio.to_thread(client.close)  # (it flushes: not on the daemon's loop)

    asyncio.run(main())


# ---- the wire, by hand ---------------------------------------------------------------------------


def _records(start: int, n: int) -> bytes:
    recs = [
        prepare_record(f"{i},1\n", "0", "text/csv", "text/csv", str(i), None, None, None, None, 1 << 20)[0]
        for i in range(start, start + n)
    ]
    return msgspec.msgpack.encode(recs)


class RawV2:
    """A protocol 2 client written by hand: HELLO, numbered BATCHes, FLUSH."""

    def __init__(self, path: str, session: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = frames.FrameReader()
        self.sock.sendall(frames.encode_frame(frames.Kind.HELLO, (session, 1 << 20), 2))

    def ack(self) -> frames.Ack:
        while True:
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            for kind, payload in self.reader.feed(data):
                assert kind == frames.Kind.ACK, bytes(payload)
                return frames.ack_decoder.decode(payload)

    def batch(self, first: int, n: int) -> None:
        self.sock.sendall(frames.batch_frame_v2(first, _records(first, n)))

    def flush(self, seq: int) -> frames.Ack:
        self.sock.sendall(frames.encode_frame(frames.Kind.FLUSH, (seq,), 2))
        while True:
            ack = self.ack()
            if ack.seq == seq:
                return ack

    def close(self) -> None:
        self.sock.close()


def test_a_frame_resent_after_a_crash_is_skipped_not_written_twice(daemon: DaemonProcess) -> None:
    """A session's frame is written and acknowledged; the daemon is killed (SIGKILL) and started
    again; the client, not having seen that ACK (say), sends the same frame again. The new daemon
    knows from the journal how far the session got: HELLO is answered with it, the resent records
    are skipped and counted `resent` (not received), and each record is delivered once. A frame
    overlapping the taken ones is cut where they end."""
    session = os.urandom(16)
    c = RawV2(daemon.socket_path, session)
    assert c.ack() == frames.Ack(0, 0)
    c.batch(0, 10)
    assert c.flush(1) == frames.Ack(1, 10)
    c.close()
    daemon.stop(signal.SIGKILL)
    daemon.start()
    c = RawV2(daemon.socket_path, session)
    assert c.ack() == frames.Ack(0, 10)  # the journal remembered
    c.batch(0, 10)  # all taken before
    c.batch(5, 10)  # 5..9 taken before, 10..14 new
    assert c.flush(2) == frames.Ack(2, 15)
    c.close()
    counters = daemon.status()["counters"]
    assert counters == {"received": 5, "written": 5, "dropped": {}, "resent": 15}
    daemon.stop()
    assert sorted(delivered_ids(daemon)) == list(range(15))


def test_data_whose_journal_entry_never_made_it_is_cut_at_start(daemon: DaemonProcess) -> None:
    """The daemon dies between writing a frame's lines and the journal entry that commits them
    (simulated: whole lines appended to the open spool file of a killed daemon). Those records
    were never acknowledged, so their client still holds them: the next start cuts the file back
    to its committed end instead of delivering them (they would arrive twice)."""
    c = RawV2(daemon.socket_path, os.urandom(16))
    c.ack()
    c.batch(0, 10)
    assert c.flush(1).records == 10
    c.close()
    daemon.stop(signal.SIGKILL)
    (part,) = daemon.spool_dir.glob("*.jsonl.part")
    lines = part.read_bytes().splitlines(keepends=True)
    with open(part, "ab") as fh:
        fh.write(b"".join(lines[:3]))  # whole lines, as an uncommitted frame would leave them
    daemon.start()
    daemon.stop()
    assert sorted(delivered_ids(daemon)) == list(range(10))
    assert "its end was torn or uncommitted" in daemon.log()


def test_a_protocol_1_client_is_served_as_before(short_tmp: Path) -> None:
    """Raw version 1 frames (no HELLO, no numbers): taken, answered with a version 1 ACK
    `[seq, records on this connection]` only in reply to FLUSH, and counted as received."""
    cfg = write_config(short_tmp)

    def speak_v1(path: str) -> None:  # blocking socket code: in a thread, the daemon runs on the loop
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(
                frames.frame(frames.Kind.BATCH, _records(0, 7))
                + frames.frame(frames.Kind.BATCH, _records(7, 3))
            )
            s.sendall(frames.encode_frame(frames.Kind.FLUSH, (42,)))
            head = s.recv(frames.HEADER_SIZE, socket.MSG_WAITALL)
            _, version, kind, length = frames.HEADER.unpack(head)
            assert (version, kind) == (1, frames.Kind.ACK)
            assert frames.ack_decoder.decode(s.recv(length, socket.MSG_WAITALL)) == frames.Ack(42, 10)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await asyncio.to_thread(speak_v1, cfg.socket_path)
            assert status_doc(daemon)["counters"] == {
                "received": 10,
                "written": 10,
                "dropped": {},
                "resent": 0,
            }

    asyncio.run(main())  # stopping seals and delivers; run_daemon checked that it exited 0
    assert sorted(delivered_ids(short_tmp)) == list(range(10))


class OldDaemon:
    """A stand-in for a daemon that speaks protocol 1 only, answering as the old one did:
    version 2 is refused with its exact ERROR text; BATCH records are counted, FLUSH acknowledged."""

    def __init__(self, path: str) -> None:
        self.records = 0
        self.refusals = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        taken = 0
        while not self.stop.is_set():
            head = conn.recv(frames.HEADER_SIZE, socket.MSG_WAITALL)
            if len(head) < frames.HEADER_SIZE:
                return
            _, version, kind, length = frames.HEADER.unpack(head)
            if version != 1:
                self.refusals += 1
                text = f"protocol version {version} is not supported; this peer speaks version 1"
                conn.sendall(frames.frame(frames.Kind.ERROR, text.encode()))
                return
            payload = conn.recv(length, socket.MSG_WAITALL) if length else b""
            if kind == frames.Kind.BATCH:
                n = len(msgspec.msgpack.decode(payload))
                taken += n
                self.records += n
            elif kind == frames.Kind.FLUSH:
                (seq,) = msgspec.msgpack.decode(payload)
                conn.sendall(frames.encode_frame(frames.Kind.ACK, (seq, taken)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def test_a_new_client_falls_back_to_protocol_1_with_an_old_daemon(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon that speaks only protocol 1 refuses HELLO: the client says so once (at most
    once from now on), speaks protocol 1, and its records arrive; flush() is True."""
    old = OldDaemon(str(short_tmp / "old.sock"))
    try:
        with caplog.at_level(logging.WARNING, logger="captured.client.sync"):
            client = CaptureClient(str(short_tmp / "old.sock"))
            for i in range(50):
                assert client.capture(**csv_pair(i))
            assert client.flush(timeout=10)
            for i in range(50, 60):
                assert client.capture(**csv_pair(i))
            assert client.flush(timeout=10)
            stats = client.stats()
            client.close()
    finally:
        old.close()
    assert stats["protocol"] == 1 and stats["acknowledged"] == 60 == old.records
    # Once as a rule; twice when a write fails on the refused connection before its ERROR is read.
    assert 1 <= old.refusals <= 2
    assert len([r for r in caplog.records if "speaks protocol version 1 only" in r.getMessage()]) == 1


def test_counters_add_up_while_the_daemon_is_away(short_tmp: Path) -> None:
    """With no daemon, records are buffered (then dropped `buffer_full`): never unaccounted."""
    client = CaptureClient(str(short_tmp / "absent.sock"), buffer_bytes=32 * 1024)
    for i in range(2000):
        client.capture(**csv_pair(i))
    stats = client.stats()
    assert adds_up(stats) and stats["buffered"] > 0 and stats["dropped"]["buffer_full"] > 0
    client.close(timeout=0.2)
    stats = client.stats()
    assert adds_up(stats) and stats["buffered"] == 0 and stats["dropped"]["closed"] > 0
