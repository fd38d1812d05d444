"""Hostile and broken input: properties of the encoder, bounded memory for huge frames and for
many unfinished ones, and a fuzz run against a live daemon while a good client keeps capturing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from captured.client.aio import AsyncCaptureClient
from captured.daemon.encode import LineEncoder
from captured.daemon.pipeline import CounterStats, Pipeline
from captured.daemon.spool import Spool
from captured.daemon.watermark import CaptureGate
from captured.service.config import load_config
from captured.service.configfile import Overrides
from captured.testing.daemon import DaemonProcess
from captured.testing.data import dcc
from captured.testing.inprocess import (
    FakeClock,
    delivered_lines,
    eventually,
    run_daemon,
    status_doc,
    write_config,
)
from captured.wire import frames
from captured.wire.frames import Record

# -- the encoder, for any record ------------------------------------------------------------------

content_types = st.one_of(
    st.none(),
    st.sampled_from(["text/csv", "application/json", "TEXT/CSV; charset=utf-8", "application/x-npy"]),
    st.text(max_size=40),
)
bodies = st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=200).map(str.encode))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(bodies, bodies, content_types, content_types, st.floats(0, 4e9), st.booleans()), max_size=20
    )
)
def test_every_line_is_sagemaker_json_that_gives_back_the_bodies(rows: list[Any]) -> None:
    """Whatever the bodies and content types: one compact JSON line per record with something to
    capture, keys in
    SageMaker's order, and each side's data decodes back to the exact body (text kept as is,
    anything else BASE64)."""
    enc = LineEncoder(dcc())
    records = [
        Record(req, resp, rct, pct, t, None, str(i) if iid else None)
        for i, (req, resp, rct, pct, t, iid) in enumerate(rows)
    ]
    groups, invalid, empty, _ = enc.group_lines(records, "AllTraffic", lambda v: False)
    assert invalid == 0
    # A record with neither body has nothing to capture: counted, never a line.
    assert empty == sum(1 for req, resp, *_ in rows if req is None and resp is None)
    lines = [line for g in groups.values() for line in enc.encode(g.lines).splitlines(keepends=True)]
    assert len(lines) == len(records) - empty
    by_time = {}
    for raw in lines:
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        doc = json.loads(raw)
        assert list(doc) == ["captureData", "eventMetadata", "eventVersion"] and doc["eventVersion"] == "0"
        by_time.setdefault(doc["eventMetadata"].get("inferenceId"), []).append(doc)
    for i, (req, resp, _, _, _, iid) in enumerate(rows):
        if not iid:
            continue
        if req is None and resp is None:
            assert str(i) not in by_time
            continue
        (doc,) = by_time[str(i)]
        for side, body in (("endpointInput", req), ("endpointOutput", resp)):
            if body is None:
                assert side not in doc["captureData"]
                continue
            got = doc["captureData"][side]
            assert list(got) == ["observedContentType", "mode", "data", "encoding"]
            data = base64.b64decode(got["data"]) if got["encoding"] == "BASE64" else got["data"].encode()
            assert data == body


@pytest.mark.parametrize(
    "field",
    [
        {"inference_id": ""},
        {"inference_id": "x" * 65},
        {"inference_id": "line\nbreak"},
        {"inference_id": " leading space"},
        {"custom_attributes": "caf\u00e9"},
        {"custom_attributes": "a" * 1025},
        {"event_id": ""},
        {"event_id": "e" * 129},
        {"request_content_type": "t/" + "x" * 1023},
    ],
)
def test_the_daemon_refuses_metadata_the_client_would_have_refused(field: dict[str, str]) -> None:
    """Lengths are refused by the decoder, characters by the encoder: either way the record is
    refused and counted, and the rest of its batch is kept."""
    base = {
        "request": b"1",
        "response": b"2",
        "request_content_type": "text/csv",
        "response_content_type": "text/csv",
    }
    bad = Record(**{**base, "inference_time": 1.0e9, **field})  # type: ignore[arg-type]
    good = Record(**{**base, "inference_time": 1.0e9})  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            overrides=Overrides(
                destination=f"file://{tmp}/out", spool_dir=f"{tmp}/spool", socket_path=f"{tmp}/s"
            ),
            environ={},
            cwd=tmp,
        )
        spool = Spool(cfg.spool_dir, cfg.spool, lambda p, n: None)
        pipeline = Pipeline(cfg, spool, CaptureGate(cfg.spool_dir, cfg.watermark))
        assert pipeline.process(msgspec.msgpack.encode([good, bad, good])) == 3
        spool.seal_all()
    assert pipeline.counters.statistics() == CounterStats(
        received=3, written=2, dropped={"invalid_record": 1}, resent=0
    )


# -- memory ------------------------------------------------------------------------------------------


def peak_rss_mb(d: DaemonProcess) -> float:
    with open(f"/proc/{d.proc.pid}/status") as fh:  # type: ignore[union-attr]
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def tiny_batch(n: int, t: float | None = None) -> bytes:
    rec = Record(b"1,2\n", b"0", "text/csv", "text/csv", t or time.time())
    return frames.frame(frames.Kind.BATCH, msgspec.msgpack.encode([rec] * n))


def test_a_maximum_size_frame_of_tiny_records_keeps_memory_bounded(daemon: DaemonProcess) -> None:
    """16 MiB of ~40-byte records (400,000 records in one frame): all written, and the daemon's
    peak RSS stays far below what decoding them all at once took (~700 MB): under 200 MB."""
    n = (16 * 1024 * 1024 - 64) // len(
        msgspec.msgpack.encode(Record(b"1,2\n", b"0", "text/csv", "text/csv", 1.0e9))
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(tiny_batch(n) + frames.encode_frame(frames.Kind.FLUSH, (1,)))
        reader = frames.FrameReader()
        acked = False
        s.settimeout(60)
        while not acked:
            acked = any(kind == frames.Kind.ACK for kind, _ in reader.feed(s.recv(65536)))
    c = daemon.status()["counters"]
    assert c["received"] == c["written"] == n
    assert peak_rss_mb(daemon) < 200


def test_unfinished_frames_beyond_the_budget_close_the_connection_that_crosses_it(short_tmp: Path) -> None:
    """max_buffered_bytes = 13 MiB: two clients each leave 8 MiB of a 12 MiB frame unfinished;
    the second is closed (memory_limit), the first finishes its frame and its record is written,
    and a good client is served."""
    cfg = write_config(
        short_tmp, extra_toml="[ingest]\nmax_frame_bytes = 12648448\nmax_buffered_bytes = 13631488\n"
    )
    big = Record(b"7" * (12 * 1024 * 1024 - 200) + b"\n", None, "text/csv", None, time.time())
    frame = frames.frame(frames.Kind.BATCH, msgspec.msgpack.encode([big]))
    half = 8 * 1024 * 1024

    def send_half_closed(s: socket.socket) -> None:
        s.settimeout(10)
        with contextlib.suppress(OSError):  # closed while sending: fine
            s.sendall(frame[:half])

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            # Blocking socket code runs in threads while the loop runs the daemon.
            with (
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first,
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second,
            ):
                await asyncio.to_thread(first.connect, cfg.socket_path)
                await asyncio.to_thread(second.connect, cfg.socket_path)
                await asyncio.to_thread(first.sendall, frame[:half])
                await eventually(lambda: status_doc(daemon)["ingest"]["connections"] >= 2)
                await asyncio.to_thread(send_half_closed, second)
                await eventually(
                    lambda: status_doc(daemon)["ingest"]["connections_closed"].get("memory_limit") == 1
                )
                await asyncio.to_thread(first.sendall, frame[half:])
                await eventually(lambda: status_doc(daemon)["counters"]["written"] == 1)
            async with AsyncCaptureClient(cfg.socket_path) as client:
                assert client.capture(b"1,2\n", b"0", request_content_type="text/csv")
                assert await client.flush(timeout=10)
            assert status_doc(daemon)["counters"]["written"] == 2

    asyncio.run(main())


# -- fuzz: hostile clients beside a good one -----------------------------------------------------


def hostile_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    rec = Record(b"1,2\n", b"0", "text/csv", "text/csv", time.time())
    good_payload = msgspec.msgpack.encode([rec])
    return [
        ("random bytes", rng.randbytes(4096)),
        ("length beyond the maximum", b"CP\x01\x01\x7f\xff\xff\xff" + rng.randbytes(100)),
        ("truncated frame", frames.frame(frames.Kind.BATCH, good_payload * 1)[:-3]),
        (
            "wrong schema",
            frames.frame(frames.Kind.BATCH, msgspec.msgpack.encode([{"request": 1}, [1, 2, 3]])),
        ),
        ("wrong types", frames.frame(frames.Kind.BATCH, msgspec.msgpack.encode([[1, 2, 3, 4, "now"]]))),
        (
            "invalid UTF-8 in a text field",
            frames.frame(
                frames.Kind.BATCH, b"\x91\x95\xc4\x01a\xc0\xa2\xff\xfe\xc0\xcb" + b"\x41\xd0" + b"\x00" * 6
            ),
        ),
        (
            "variant escaping the tree",
            frames.frame(
                frames.Kind.BATCH,
                msgspec.msgpack.encode(
                    [Record(b"1", b"2", "text/csv", "text/csv", time.time(), variant_name="../../etc")]
                ),
            ),
        ),
        ("not a batch", frames.frame(frames.Kind.BATCH, b"\xa5hello")),
        ("a kind clients may not send", frames.frame(frames.Kind.ACK, b"\x90")),
        ("nested too deep", frames.frame(frames.Kind.BATCH, b"\x91" * 5000)),
    ]


def test_fuzz_hostile_clients_beside_a_good_one(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """While a well-behaved client captures 5,000 records, other connections send garbage,
    oversized lengths, truncated frames, wrong schemas and types, invalid UTF-8, variant names
    that try to leave the tree; 300 idle connections sit open; one client trickles a byte every
    50 ms. Afterwards: every record of the good client was delivered exactly once, every refusal
    was counted, the counters add up, no file escaped the destination tree, and the daemon still
    runs. Bounded: 20 rounds of the hostile set, at most 60 s."""
    cfg = write_config(short_tmp, extra_toml="[spool]\nmax_file_age_s = 1\n[ingest]\nframe_timeout_s = 1\n")
    out_dir = short_tmp / "out"
    rng = random.Random(1234)
    clock = FakeClock()

    async def good() -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(5000):
                while not client.capture(
                    f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i)
                ):
                    await asyncio.sleep(0.001)
                if i % 500 == 0:
                    await asyncio.sleep(0.05)
            assert await client.flush(timeout=30)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(cfg.socket_path)
        return s

    def hostile(loop: asyncio.AbstractEventLoop, trickler: socket.socket, deadline: float) -> None:
        trickle = tiny_batch(50)
        for round_ in range(20):
            for _name, data in hostile_payloads(rng):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(cfg.socket_path)
                    with contextlib.suppress(OSError):  # the daemon may close first
                        s.sendall(data)
            with contextlib.suppress(OSError):
                trickler.sendall(trickle[round_ : round_ + 1])
            time.sleep(0.05)
            # The spool's max_file_age_s runs on the daemon's clock: let it age as real time does.
            loop.call_soon_threadsafe(clock.advance, 0.05)
            assert time.monotonic() < deadline

    async def main() -> dict[str, Any]:
        async with run_daemon(cfg, clock=clock) as daemon:
            # Blocking socket code runs in threads while the loop runs the daemon (and accepts).
            idle: list[socket.socket] = []
            trickler: socket.socket | None = None
            try:
                for _ in range(300):
                    idle.append(await asyncio.to_thread(connect))
                trickler = await asyncio.to_thread(connect)
                good_task = asyncio.create_task(good())
                deadline = time.monotonic() + 60
                try:
                    await asyncio.to_thread(hostile, asyncio.get_running_loop(), trickler, deadline)
                    await asyncio.wait_for(asyncio.shield(good_task), max(1.0, deadline - time.monotonic()))
                finally:
                    if not good_task.done():
                        good_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await good_task
                await eventually(
                    lambda: status_doc(daemon)["ingest"]["connections_closed"].get("stalled_frame"),
                    timeout=10,
                )
            finally:
                for s in idle:
                    s.close()
                if trickler is not None:
                    trickler.close()
            st_ = status_doc(daemon)
        return st_  # the daemon still ran; run_daemon checked that it then exited 0

    with caplog.at_level(logging.INFO, logger="captured"):
        st_ = asyncio.run(main())
    c = st_["counters"]
    assert c["received"] == c["written"] + sum(c["dropped"].values())
    errors = st_["ingest"]["connections_closed"]
    assert st_["ingest"]["connections_total"] >= 300 + 20 * len(hostile_payloads(rng))
    for reason in ("bad_header", "frame_too_large", "bad_payload", "unexpected_kind", "stalled_frame"):
        assert errors.get(reason, 0) >= 1, errors
    assert "internal_error" not in errors, caplog.text  # every case has a named reason
    assert c["dropped"].get("invalid_record", 0) >= 20  # wrong schema/types, bad variant, every round
    ids = sorted(
        int(line["eventMetadata"]["inferenceId"])
        for line in delivered_lines(short_tmp)
        if "inferenceId" in line["eventMetadata"]
    )
    assert ids == list(range(5000))
    for path in out_dir.rglob("*"):
        assert out_dir in path.resolve().parents
    assert os.path.isdir(out_dir / "test-endpoint") and sorted(p.name for p in out_dir.iterdir()) == [
        "test-endpoint"
    ]
