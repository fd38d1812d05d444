"""The socket server in-process (`captured.daemon.ingest`): a real `IngestServer` on the test's
own event loop, a real Pipeline, Spool (inline `Syncer`) and Ledger in a short temporary
directory, and raw frames (`captured.wire.frames`) over a real Unix socket.

Each test counts on both sides: what the client sent and was told (ACK), the pipeline's
counters, the server's connection statistics, the journal, and the lines in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from captured.daemon import ingest as ingest_module
from captured.daemon.ingest import CLOSE_REASONS, IngestServer
from captured.daemon.ledger import Ledger, read_entries, replay
from captured.daemon.pipeline import CounterStats, Pipeline
from captured.daemon.spool import Spool
from captured.daemon.watermark import CaptureGate, Usage
from captured.service.config import Config, load_config
from captured.wire import frames
from captured.wire.frames import Kind, Record

T = TypeVar("T")
#: Every wait on the socket is bounded by this.
WAIT_S = 2.0
SESSION = bytes(range(16))


def write_config(root: Path) -> Config:
    path = root / "captured.toml"
    path.write_text(
        'endpoint_name = "ep"\n'
        'variant_name = "AllTraffic"\n'
        'socket_path = "c.sock"\n'
        'spool_dir = "spool"\n'
        "[DataCaptureConfig]\n"
        "InitialSamplingPercentage = 100\n"
        'DestinationS3Uri = "s3://bucket/capture"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        "[DataCaptureConfig.CaptureContentTypeHeader]\n"
        'CsvContentTypes = ["text/csv"]\n'
    )
    return load_config(str(path))


@dataclass
class Rig:
    cfg: Config
    server: IngestServer
    pipeline: Pipeline
    spool: Spool
    ledger: Ledger
    status_calls: list[float] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)

    async def connect(self) -> Peer:
        """A raw client on the server's socket, closed at the end of `serving` at the latest."""
        peer = await Peer.connect(self.cfg.socket_path)
        self.peers.append(peer)
        return peer

    def counters(self) -> CounterStats:
        return self.pipeline.counters.statistics()

    def closed(self) -> dict[str, int]:
        return self.server.stats.statistics().connections_closed

    def journal(self) -> tuple[dict[bytes, int], dict[str, int]]:
        """The sessions and committed file ends the journal holds, as a restart reads them."""
        entries, _ = read_entries(Path(self.ledger.path).read_bytes())
        return replay(entries)

    def lines_in_spool(self) -> int:
        self.spool.seal_all()
        return sum(p.read_bytes().count(b"\n") for p in Path(self.cfg.spool_dir).glob("*.jsonl"))


@contextlib.asynccontextmanager
async def serving(root: Path, **server_kw: Any) -> AsyncIterator[Rig]:
    """An IngestServer listening on `root/c.sock` (a socket the test binds and hands over), on
    the running loop; stopped, drained and every connection gone at the end."""
    cfg = write_config(root)
    ledger = Ledger(cfg.spool_dir)
    spool = Spool(cfg.spool_dir, cfg.spool, lambda p, n: None, ledger=ledger)
    ledger.open()
    gate = CaptureGate(cfg.spool_dir, cfg.watermark, usage=lambda path: Usage(100, 1, 99, 1.0))
    pipeline = Pipeline(cfg, spool, gate)
    calls: list[float] = []

    def status() -> object:
        calls.append(time.monotonic())
        return {"counters": pipeline.counters.statistics(), "ingest": server.stats.statistics()}

    server = IngestServer(
        pipeline, ledger, max_frame_bytes=cfg.ingest.max_frame_bytes, status=status, **server_kw
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(cfg.socket_path)
        sock.listen()
        sock.setblocking(False)
        await server.start(sock=sock)  # the server owns it from here
    except BaseException:
        sock.close()
        raise
    rig = Rig(cfg, server, pipeline, spool, ledger, calls)
    try:
        yield rig
    finally:
        for peer in rig.peers:  # a failed test's too: no transport outlives the loop
            await peer.close()
        server.stop_accepting()
        await server.drain(WAIT_S, quiet_s=0)
        await until(lambda: not server.connections)
        spool.seal_all()
        ledger.close()


async def until(predicate: Callable[[], T]) -> T:
    """Poll `predicate` on the loop until it is true; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return value


def bounded(aw: Awaitable[T]) -> Awaitable[T]:
    return asyncio.wait_for(aw, WAIT_S)


class Peer:
    """A raw client: frames out, frames in (header version kept), over a real Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> Peer:
        reader, writer = await bounded(asyncio.open_unix_connection(path))
        return cls(reader, writer)

    async def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))
        await bounded(self.writer.drain())

    async def frame(self) -> tuple[int, int, bytes]:
        """The next frame as (version, kind, payload)."""
        head = await bounded(self.reader.readexactly(frames.HEADER_SIZE))
        _, version, kind, length = frames.HEADER.unpack(head)
        return version, kind, await bounded(self.reader.readexactly(length))

    async def ack(self, seq: int) -> tuple[int, frames.Ack]:
        """The ACK answering FLUSH `seq` (timer ACKs with seq 0 before it are passed over)."""
        while True:
            version, kind, payload = await self.frame()
            assert kind == Kind.ACK, (kind, payload)
            ack = frames.ack_decoder.decode(payload)
            if ack.seq == seq:
                return version, ack
            assert ack.seq == 0

    async def error(self) -> str:
        """The ERROR text, passing over ACKs before it; then the daemon closes the connection."""
        while True:
            _, kind, payload = await self.frame()
            if kind == Kind.ERROR:
                assert await bounded(self.reader.read()) == b""  # closed after it
                return payload.decode()
            assert kind == Kind.ACK

    async def close(self) -> None:
        """Idempotent: the test closes its peers, and `serving` closes them all again."""
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await bounded(self.writer.wait_closed())


def records(start: int, n: int) -> bytes:
    return msgspec.msgpack.encode(
        [
            Record(f"{i},1\n".encode(), b"0", "text/csv", "text/csv", time.time(), inference_id=str(i))
            for i in range(start, start + n)
        ]
    )


def batch_v1(start: int, n: int) -> bytes:
    return frames.frame(Kind.BATCH, records(start, n))


def flush(seq: int, version: int = 1) -> bytes:
    return frames.encode_frame(Kind.FLUSH, (seq,), version)


def hello(window: int = 0) -> bytes:
    return frames.encode_frame(Kind.HELLO, (SESSION, window), 2)


def test_protocol_1_batches_then_flush_are_acknowledged_with_the_records_taken(short_tmp: Path) -> None:
    """Two BATCH frames (5 and 3 records) and FLUSH 7 in one write: ACK [7, 8]; one more BATCH
    of 2 and FLUSH 8: ACK [8, 10] (records taken on this connection so far). The counters, the
    journal's committed end and the spool's lines all say 10."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            await peer.send(batch_v1(0, 5), batch_v1(5, 3), flush(7))
            assert await peer.ack(7) == (1, frames.Ack(7, 8))
            await peer.send(batch_v1(8, 2), flush(8))
            assert await peer.ack(8) == (1, frames.Ack(8, 10))
            assert rig.counters() == CounterStats(received=10, written=10, dropped={}, resent=0)
            (part,) = Path(rig.cfg.spool_dir).glob("*.part")
            _, files = rig.journal()
            assert files == {part.name.removesuffix(".jsonl.part"): part.stat().st_size}
            await peer.close()
            assert rig.lines_in_spool() == 10
            await until(lambda: rig.server.stats.connections == 0)
            stats = rig.server.stats.statistics()
            assert (stats.connections_total, stats.connections_closed) == (1, {})

    asyncio.run(main())


def test_protocol_2_hello_then_batches_with_sequence_numbers_are_acknowledged(short_tmp: Path) -> None:
    """HELLO is answered ACK [0, 0] (where the new session stands); BATCH frames numbered 0
    (4 records) and 4 (3 records), then FLUSH 1: ACK [1, 7], all in version 2 headers, and the
    journal holds the session at 7 before the client reads that ACK."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            await peer.send(hello())
            assert await peer.ack(0) == (2, frames.Ack(0, 0))
            await peer.send(frames.batch_frame_v2(0, records(0, 4)), frames.batch_frame_v2(4, records(4, 3)))
            await peer.send(flush(1, 2))
            assert await peer.ack(1) == (2, frames.Ack(1, 7))
            sessions, _ = rig.journal()
            assert sessions == {SESSION: 7}
            assert rig.ledger.sessions[SESSION].committed == 7
            assert rig.counters() == CounterStats(received=7, written=7, dropped={}, resent=0)
            await peer.close()
            assert rig.lines_in_spool() == 7

    asyncio.run(main())


def test_a_resent_batch_of_a_known_session_is_skipped_and_counted_resent(short_tmp: Path) -> None:
    """Connection 1 of a session sends records 0-3 and is acknowledged [1, 4]. Connection 2 of
    the same session is told [0, 4] by HELLO, yet resends the frame from 0 (4 records: all
    skipped), a frame from 2 (4 records: 2 skipped, 2 new) and a frame from 6 (3 new): ACK
    [2, 9]. resent 6, received 9, the spool holds records 0-8 once each."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            first = await rig.connect()
            await first.send(hello(), frames.batch_frame_v2(0, records(0, 4)), flush(1, 2))
            assert await first.ack(1) == (2, frames.Ack(1, 4))
            await first.close()
            second = await rig.connect()
            await second.send(hello())
            assert await second.ack(0) == (2, frames.Ack(0, 4))
            await second.send(
                frames.batch_frame_v2(0, records(0, 4)),
                frames.batch_frame_v2(2, records(2, 4)),
                frames.batch_frame_v2(6, records(6, 3)),
                flush(2, 2),
            )
            assert await second.ack(2) == (2, frames.Ack(2, 9))
            assert rig.counters() == CounterStats(received=9, written=9, dropped={}, resent=6)
            sent = 4 + 4 + 4 + 3
            assert rig.counters().received + rig.counters().resent == sent
            await second.close()
            rig.spool.seal_all()
            ids = sorted(
                int(line.split(b'"inferenceId":"')[1].split(b'"')[0])
                for p in Path(rig.cfg.spool_dir).glob("*.jsonl")
                for line in p.read_bytes().splitlines()
            )
            assert ids == list(range(9))

    asyncio.run(main())


def test_protocol_2_acknowledges_by_window_and_by_time_without_a_flush(short_tmp: Path) -> None:
    """HELLO with a 16 KiB window (acknowledge after a quarter: 4 KiB of new frames). A BATCH of
    more than 4 KiB (120 records) is acknowledged at once, ACK [0, 120]; a small one (2 records)
    after ACK_INTERVAL_S, by the timer, ACK [0, 122]. No FLUSH is sent; the journal holds 122."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            await peer.send(hello(window=16384))
            assert await peer.ack(0) == (2, frames.Ack(0, 0))
            big = frames.batch_frame_v2(0, records(0, 120))
            assert len(big) > 4096
            await peer.send(big)
            assert await peer.ack(0) == (2, frames.Ack(0, 120))
            sent_at = time.monotonic()
            await peer.send(frames.batch_frame_v2(120, records(120, 2)))
            assert await peer.ack(0) == (2, frames.Ack(0, 122))
            assert time.monotonic() - sent_at >= frames.ACK_INTERVAL_S * 0.9  # by the timer
            assert rig.journal()[0] == {SESSION: 122}
            assert rig.counters() == CounterStats(received=122, written=122, dropped={}, resent=0)
            await peer.close()
            assert rig.lines_in_spool() == 122

    asyncio.run(main())


BAD_FRAMES = [
    ("bad_header", b"XX\x01\x01\x00\x00\x00\x00"),
    ("unsupported_version", b"CP\x09\x01\x00\x00\x00\x00"),
    ("unknown_kind", b"CP\x01\x63\x00\x00\x00\x00"),
    ("frame_too_large", frames.HEADER.pack(frames.MAGIC, 1, Kind.BATCH, 2**31)),
    ("unexpected_kind", frames.encode_frame(Kind.ACK, (1, 1))),
    ("bad_payload", frames.frame(Kind.BATCH, b"\xa5hello")),
]


@pytest.mark.parametrize(("reason", "data"), BAD_FRAMES, ids=[r for r, _ in BAD_FRAMES])
def test_a_bad_frame_after_a_good_batch_closes_the_connection_with_its_reason(
    short_tmp: Path, reason: str, data: bytes
) -> None:
    """A good BATCH of 3 records and then a broken frame, in one write: the 3 records count
    (received and written), the client reads ERROR "<reason>: ..." and then the end of the
    stream, and `connections_closed` holds that reason once. Other connections go on: a second
    client is served afterwards."""
    assert reason in CLOSE_REASONS

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            await peer.send(batch_v1(0, 3), data)
            text = await peer.error()
            assert text.startswith(f"{reason}: ")
            await peer.close()
            assert rig.closed() == {reason: 1}
            assert rig.counters() == CounterStats(received=3, written=3, dropped={}, resent=0)
            other = await rig.connect()
            await other.send(batch_v1(3, 1), flush(1))
            assert await other.ack(1) == (1, frames.Ack(1, 1))
            await other.close()
            assert rig.lines_in_spool() == 4
            stats = rig.server.stats.statistics()
            assert (stats.connections_total, stats.connections_closed) == (2, {reason: 1})

    asyncio.run(main())


def test_bad_magic_alone_is_bad_header(short_tmp: Path) -> None:
    """The first 8 bytes are not a captured frame: ERROR "bad_header: not a captured frame (bad
    magic)", nothing counted as received, `connections_closed` {"bad_header": 1}."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            await peer.send(b"GET / HTTP/1.1\r\n\r\n")
            assert await peer.error() == "bad_header: not a captured frame (bad magic)"
            await peer.close()
            assert rig.closed() == {"bad_header": 1}
            assert rig.counters() == CounterStats(received=0, written=0, dropped={}, resent=0)
            await until(lambda: rig.server.stats.connections == 0)

    asyncio.run(main())


@pytest.mark.parametrize("version", [1, 2])
def test_status_is_answered_from_the_status_callback(short_tmp: Path, version: int) -> None:
    """STATUS after 2 records: one STATUS_REPLY in the connection's protocol version, carrying
    what the `status` callback returned (called once, when the frame arrived)."""

    async def main() -> None:
        async with serving(short_tmp) as rig:
            peer = await rig.connect()
            if version == 2:
                await peer.send(hello(), frames.batch_frame_v2(0, records(0, 2)), flush(1, 2))
                await peer.ack(1)
            else:
                await peer.send(batch_v1(0, 2), flush(1))
                await peer.ack(1)
            assert rig.status_calls == []
            await peer.send(frames.encode_frame(Kind.STATUS, [], version))
            got_version, kind, payload = await peer.frame()
            assert (got_version, kind) == (version, Kind.STATUS_REPLY)
            doc = msgspec.msgpack.decode(payload)
            assert len(rig.status_calls) == 1
            assert doc["counters"] == {"received": 2, "written": 2, "dropped": {}, "resent": 0}
            assert doc["ingest"] == {"connections": 1, "connections_total": 1, "connections_closed": {}}
            await peer.close()

    asyncio.run(main())


def test_at_the_connection_cap_a_busy_peer_is_kept_and_an_idle_one_evicted(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_connections = 1 (EVICT_IDLE_S shortened to 0.1 s so the test is quick).

    1. A (protocol 2) has 3 records taken and half a frame under way: not idle.
    2. B connects: refused at once, ERROR "too_many_connections: ...".
    3. A finishes its frame (2 records) and is acknowledged [1, 5]; then stays idle > 0.1 s.
    4. C connects: A is closed to make room, told ACK [0, 5] (what was taken) and ERROR
       "idle_evicted: ..."; C is served.
    Closed: {too_many_connections: 1, idle_evicted: 1}; connections_total 3; every record of A
    and C in the spool."""
    monkeypatch.setattr(ingest_module, "EVICT_IDLE_S", 0.1)

    async def main() -> None:
        async with serving(short_tmp, max_connections=1) as rig:
            a = await rig.connect()
            await a.send(hello(), frames.batch_frame_v2(0, records(0, 3)), flush(1, 2))
            assert await a.ack(1) == (2, frames.Ack(1, 3))
            half = frames.batch_frame_v2(3, records(3, 2))
            await a.send(half[:10])
            await until(lambda: any(c.reader.buffered for c in rig.server.connections))
            b = await rig.connect()
            assert (await b.error()).startswith("too_many_connections: ")
            await b.close()
            await a.send(half[10:], flush(2, 2))
            assert await a.ack(2) == (2, frames.Ack(2, 5))
            await asyncio.sleep(0.15)
            c = await rig.connect()
            assert (await a.error()).startswith("idle_evicted: ")  # (the ACK before it: next test)
            await c.send(batch_v1(5, 4), flush(1))
            assert await c.ack(1) == (1, frames.Ack(1, 4))
            await a.close()
            await c.close()
            assert rig.counters() == CounterStats(received=9, written=9, dropped={}, resent=0)
            assert rig.lines_in_spool() == 9
            await until(lambda: rig.server.stats.connections == 0)
            stats = rig.server.stats.statistics()
            assert stats.connections_total == 3
            assert stats.connections_closed == {"too_many_connections": 1, "idle_evicted": 1}

    asyncio.run(main())


def test_an_evicted_protocol_2_peer_is_told_what_was_taken_before_the_error(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The goodbye of an eviction: the frames A reads are exactly ACK [0, 3] then ERROR."""
    monkeypatch.setattr(ingest_module, "EVICT_IDLE_S", 0.05)

    async def main() -> None:
        async with serving(short_tmp, max_connections=1) as rig:
            a = await rig.connect()
            await a.send(hello(), frames.batch_frame_v2(0, records(0, 3)), flush(1, 2))
            assert await a.ack(1) == (2, frames.Ack(1, 3))
            await asyncio.sleep(0.1)
            c = await rig.connect()
            version, kind, payload = await a.frame()
            assert (version, kind, frames.ack_decoder.decode(payload)) == (2, Kind.ACK, frames.Ack(0, 3))
            version, kind, payload = await a.frame()
            assert (version, kind) == (1, Kind.ERROR) and payload.startswith(b"idle_evicted: ")
            for peer in (a, c):
                await peer.close()
            assert rig.closed() == {"idle_evicted": 1}

    asyncio.run(main())
