"""The wire format: header rules and the incremental frame reader."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from captured.client.record import batch_frames, prepare_record
from captured.wire import frames


def test_header_round_trip() -> None:
    data = frames.encode_frame(frames.Kind.FLUSH, (7,))
    kind, length = frames.parse_header(data, 1024)
    assert kind == frames.Kind.FLUSH and length == len(data) - frames.HEADER_SIZE
    assert frames.flush_decoder.decode(data[frames.HEADER_SIZE :]).seq == 7


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"XX\x01\x01\x00\x00\x00\x00", "bad_header"),
        (b"CP\x03\x01\x00\x00\x00\x00", "unsupported_version"),
        (b"CP\x01\x63\x00\x00\x00\x00", "unknown_kind"),
        (b"CP\x01\x01\x7f\x00\x00\x00", "frame_too_large"),
    ],
)
def test_bad_headers(raw: bytes, reason: str) -> None:
    with pytest.raises(frames.ProtocolError) as err:
        frames.FrameReader(1 << 20).feed(raw)
    assert err.value.reason == reason


def test_version_error_says_what_is_supported() -> None:
    with pytest.raises(frames.ProtocolError, match=r"version 3 is not supported.*speaks versions 1 and 2"):
        frames.parse_header(b"CP\x03\x01\x00\x00\x00\x00", 1024)


def _records(n: int) -> list[tuple[object, ...]]:
    return [
        prepare_record(
            b"1,2,3\n" * i, "0.5", "text/csv", "text/csv", str(i + 1), None, None, None, 1.5 + i, 1 << 20
        )[0]
        for i in range(n)
    ]


@given(st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=40), st.integers(1, 60))
def test_reader_reassembles_any_chunking(cuts: list[int], n: int) -> None:
    recs = _records(n)
    sizes = [100] * n
    stream = b"".join(f for f, _ in batch_frames(recs, sizes, 700)) + frames.encode_frame(
        frames.Kind.FLUSH, (3,)
    )
    reader = frames.FrameReader(1 << 20)
    got: list[frames.Record] = []
    flushes = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        i += 1
        for kind, payload in reader.feed(stream[pos : pos + step]):
            if kind == frames.Kind.BATCH:
                got.extend(frames.batch_decoder.decode(payload))
            else:
                flushes.append(frames.flush_decoder.decode(payload).seq)
        pos += step
    assert [r.inference_id for r in got] == [str(k + 1) for k in range(n)]
    assert flushes == [3]
    assert reader.buffered == 0


def test_batch_frames_respects_the_batch_size() -> None:
    recs = _records(10)
    out = batch_frames(recs, [100] * 10, 300)
    assert [n for _, n in out] == [3, 3, 3, 1]
    decoded = [r for f, _ in out for r in frames.batch_decoder.decode(f[frames.HEADER_SIZE :])]
    assert len(decoded) == 10


@given(st.binary(max_size=200))
def test_random_payloads_never_crash_the_decoders(blob: bytes) -> None:
    with contextlib.suppress(msgspec.DecodeError):
        frames.batch_decoder.decode(blob)


def _read_through(buf: frames.FrameBuffer, stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """Deliver `stream` the way a socket does: each read fills at most the buffer offered."""
    out: list[tuple[int, bytes]] = []
    pos = i = 0
    while pos < len(stream):
        target = buf.get_buffer()
        n = min(len(target), cuts[i % len(cuts)], len(stream) - pos)
        i += 1
        target[:n] = stream[pos : pos + n]
        out += [(kind, bytes(payload)) for kind, payload in buf.buffer_updated(n)]
        buf.check()
        pos += n
    return out


@given(
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
    st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=30),
    st.integers(min_value=16, max_value=4096),
)
def test_frame_buffer_gives_back_every_frame_whatever_the_reads(
    cuts: list[int], sizes: list[int], scratch_size: int
) -> None:
    """Reads into a shared scratch buffer or straight into the connection's own: every frame
    comes out whole, in order, and nothing is held at the end."""
    payloads = [bytes([k % 251]) * size for k, size in enumerate(sizes)]
    stream = b"".join(frames.frame(frames.Kind.BATCH, p) for p in payloads)
    buf = frames.FrameBuffer(1 << 20, bytearray(scratch_size), [])
    assert _read_through(buf, stream, cuts) == [(frames.Kind.BATCH, p) for p in payloads]
    assert buf.buffered == 0


def test_frame_buffer_reads_a_large_frame_in_place_and_lets_it_go() -> None:
    big = bytes(range(256)) * (5 * frames.READ_SIZE // 256)  # larger than 4 * READ_SIZE
    stream = frames.frame(frames.Kind.BATCH, big) + frames.frame(frames.Kind.FLUSH, b"\x91\x07")
    spare: list[bytearray] = []
    buf = frames.FrameBuffer(16 << 20, bytearray(frames.READ_SIZE), spare)
    got = _read_through(buf, stream, [65536])
    assert got == [(frames.Kind.BATCH, big), (frames.Kind.FLUSH, b"\x91\x07")]
    assert buf.buffered == 0 and all(len(b) <= 4 * frames.READ_SIZE for b in spare)  # not kept


def test_frame_buffer_grows_with_what_arrives_not_with_what_a_header_announces() -> None:
    """A header announcing 16 MiB followed by a trickle holds the trickle, not 16 MiB."""
    buf = frames.FrameBuffer(16 << 20, bytearray(frames.READ_SIZE), [])
    head = frames.HEADER.pack(frames.MAGIC, frames.PROTOCOL_VERSION, frames.Kind.BATCH, 16 << 20)
    assert _read_through(buf, head + b"x" * 1000, [1]) == []
    assert frames.HEADER_SIZE + 1000 <= buf.buffered <= 2 * frames.READ_SIZE  # what it costs, counted


def test_frame_buffer_hands_out_whole_frames_before_a_bad_header() -> None:
    buf = frames.FrameBuffer(1 << 20, bytearray(4096), [])
    good = frames.frame(frames.Kind.FLUSH, b"\x91\x01")
    target = buf.get_buffer()
    data = good + b"XX" + bytes(6)
    target[: len(data)] = data
    assert [(k, bytes(p)) for k, p in buf.buffer_updated(len(data))] == [(frames.Kind.FLUSH, b"\x91\x01")]
    with pytest.raises(frames.ProtocolError):
        buf.check()
    fresh = frames.FrameBuffer(1 << 20, bytearray(4096), [])
    fresh.get_buffer()[:8] = b"XX" + bytes(6)
    with pytest.raises(frames.ProtocolError):
        fresh.buffer_updated(8)


def test_between_frames_a_connection_holds_nothing_and_buffers_are_reused() -> None:
    """A finished frame's buffer goes to the spare list all connections share; the next partial
    frame, of any connection, takes it instead of allocating."""
    scratch: bytearray = bytearray(64)
    spare: list[bytearray] = []
    first = frames.FrameBuffer(1 << 20, scratch, spare)
    second = frames.FrameBuffer(1 << 20, scratch, spare)
    payload = b"p" * 500
    stream = frames.frame(frames.Kind.BATCH, payload)
    assert _read_through(first, stream, [64]) == [(frames.Kind.BATCH, payload)]
    assert first.buffered == 0 and len(spare) == 1
    kept = spare[0]
    assert _read_through(second, stream, [64]) == [(frames.Kind.BATCH, payload)]
    assert spare == [kept] and spare[0] is kept  # taken, used, given back
