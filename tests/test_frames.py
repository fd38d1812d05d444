"""The wire format: header rules and the incremental frame reader."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from captured import frames
from captured.record import batch_frames, prepare_record


def test_header_round_trip() -> None:
    data = frames.encode_frame(frames.Kind.FLUSH, (7,))
    kind, length = frames.parse_header(data, 1024)
    assert kind == frames.Kind.FLUSH and length == len(data) - frames.HEADER_SIZE
    assert frames.flush_decoder.decode(data[frames.HEADER_SIZE :]).seq == 7


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"XX\x01\x01\x00\x00\x00\x00", "bad_header"),
        (b"CP\x02\x01\x00\x00\x00\x00", "unsupported_version"),
        (b"CP\x01\x63\x00\x00\x00\x00", "unknown_kind"),
        (b"CP\x01\x01\x7f\x00\x00\x00", "frame_too_large"),
    ],
)
def test_bad_headers(raw: bytes, reason: str) -> None:
    with pytest.raises(frames.ProtocolError) as err:
        frames.FrameReader(1 << 20).feed(raw)
    assert err.value.reason == reason


def test_version_error_says_what_is_supported() -> None:
    with pytest.raises(frames.ProtocolError, match=r"version 2 is not supported.*speaks version 1"):
        frames.parse_header(b"CP\x02\x01\x00\x00\x00\x00", 1024)


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
