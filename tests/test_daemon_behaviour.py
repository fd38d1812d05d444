"""The daemon's behaviour end to end, in-process: the real client -> a real socket -> the
daemon in the test's event loop on a fake clock (`captured.testing.inprocess`) -> files in the
file:// destination. Signals, exit codes, SIGKILL recovery, socket activation and the command
line keep their subprocess tests in test_daemon.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from captured.client.aio import AsyncCaptureClient
from captured.service import cli
from captured.service.config import Config
from captured.service.configfile import Overrides
from captured.service.daemon import Daemon
from captured.testing.daemon import read_error, wait_for
from captured.testing.inprocess import (
    FakeClock,
    csv_pair,
    delivered_files,
    delivered_lines,
    raw_records,
    run_daemon,
    write_config,
)
from captured.wire import frames

UTC = dt.UTC

# The spec's observed lines (section 3), with the inputs that produce them.
SPEC_LINES = [
    (
        dict(
            request_body=b"41,0,159.3,66\n",
            response_body=b"0.01216088142246008",
            request_content_type="text/csv",
            response_content_type="text/csv; charset=utf-8",
            event_id="a727dc55-cbe1-498c-bcb9-9c12eea02b44",
            inference_id="58",
            inference_time=dt.datetime(2021, 5, 18, 0, 29, 2, 731000, tzinfo=UTC),
        ),
        '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"41,0,159.3,66\\n","encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT","data":"0.01216088142246008","encoding":"CSV"}},"eventMetadata":{"eventId":"a727dc55-cbe1-498c-bcb9-9c12eea02b44","inferenceId":"58","inferenceTime":"2021-05-18T00:29:02Z"},"eventVersion":"0"}',
    ),
    (
        dict(
            request_body='{"instances": [{"features": [28, 2, 133937, 9, 13, 2, 0, 0, 4, 1, 15024, 0, 55, 37]}]}',
            response_body='{"predictions": [{"score": 0.9899773597717285, "predicted_label": 1}]}',
            request_content_type="application/json",
            response_content_type="application/json",
            event_id="7ddb2d7c-4d6a-4e67-a68e-23870399829d",
            inference_time=dt.datetime(2024, 1, 19, 19, 27, 57, tzinfo=UTC).timestamp(),
        ),
        '{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT","data":"{\\"instances\\": [{\\"features\\": [28, 2, 133937, 9, 13, 2, 0, 0, 4, 1, 15024, 0, 55, 37]}]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"application/json","mode":"OUTPUT","data":"{\\"predictions\\": [{\\"score\\": 0.9899773597717285, \\"predicted_label\\": 1}]}","encoding":"JSON"}},"eventMetadata":{"eventId":"7ddb2d7c-4d6a-4e67-a68e-23870399829d","inferenceTime":"2024-01-19T19:27:57Z"},"eventVersion":"0"}',
    ),
    (
        dict(
            request_body=b'{"features":[28,2,133937,9,13,2,0,0,4,1,15024,0,55,37]}\n{"features":[43,2,72338,12,14,2,12,0,1,1,0,0,40,37]}',
            response_body=b'{"predicted_label":1,"score":0.989977359771728}\n{"predicted_label":1,"score":0.504138827323913}\n',
            request_content_type="application/jsonlines",
            response_content_type="application/jsonlines",
            event_id="32aaea1b-1a60-4870-b81d-40271f950c4a",
            inference_time=dt.datetime(2023, 1, 19, 5, 31, 46, 999000, tzinfo=UTC),
        ),
        '{"captureData":{"endpointInput":{"observedContentType":"application/jsonlines","mode":"INPUT","data":"{\\"features\\":[28,2,133937,9,13,2,0,0,4,1,15024,0,55,37]}\\n{\\"features\\":[43,2,72338,12,14,2,12,0,1,1,0,0,40,37]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"application/jsonlines","mode":"OUTPUT","data":"{\\"predicted_label\\":1,\\"score\\":0.989977359771728}\\n{\\"predicted_label\\":1,\\"score\\":0.504138827323913}\\n","encoding":"JSON"}},"eventMetadata":{"eventId":"32aaea1b-1a60-4870-b81d-40271f950c4a","inferenceTime":"2023-01-19T05:31:46Z"},"eventVersion":"0"}',
    ),
    (
        dict(
            request_body=b'{"median_income": [7.9761, 5.2907]}',
            response_body=b'{"median_house_value": [478046.66, 206551.01]}',
            request_content_type="application/json",
            response_content_type="text/html; charset=utf-8",
            event_id="fffc6319-59a6-446f-b30f-46c6ed1aac64",
            inference_id="c7f0edc0-9397-4cd3-a948-bd7b639da2f5",
            inference_time=dt.datetime(2021, 9, 12, 8, 3, 35, 500000, tzinfo=UTC),
        ),
        '{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT","data":"{\\"median_income\\": [7.9761, 5.2907]}","encoding":"JSON"},"endpointOutput":{"observedContentType":"text/html; charset=utf-8","mode":"OUTPUT","data":"eyJtZWRpYW5faG91c2VfdmFsdWUiOiBbNDc4MDQ2LjY2LCAyMDY1NTEuMDFdfQ==","encoding":"BASE64"}},"eventMetadata":{"eventId":"fffc6319-59a6-446f-b30f-46c6ed1aac64","inferenceId":"c7f0edc0-9397-4cd3-a948-bd7b639da2f5","inferenceTime":"2021-09-12T08:03:35Z"},"eventVersion":"0"}',
    ),
]

FILE_NAME = re.compile(
    r"(\d\d)-(\d\d)-(\d{3})-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.jsonl"
)


def capture_mode_config(root: Path, mode: str, header: bool = True) -> str:
    """A `[DataCaptureConfig]` capturing `mode` alone, with or without a CSV content type header."""
    return (
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{root / "out"}"\n'
        f'CaptureOptions = [{{ CaptureMode = "{mode}" }}]\n'
        + ('[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n' if header else "")
    )


async def capture_all(client: AsyncCaptureClient, records: list[dict[str, Any]]) -> None:
    """Capture every record (each must be accepted) and flush."""
    for r in records:
        body = {k: v for k, v in r.items() if k not in ("request_body", "response_body")}
        assert client.capture(r["request_body"], r["response_body"], **body)
    assert await client.flush(timeout=10)


def run(cfg: Config, test: Callable[[Daemon], Awaitable[None]], clock: FakeClock | None = None) -> None:
    """Run `test(daemon)` against an in-process daemon on `cfg`, then stop it (it seals and
    delivers everything open) and check that it exited 0."""

    async def main() -> None:
        async with run_daemon(cfg, clock=clock or FakeClock()) as daemon:
            await test(daemon)

    asyncio.run(main())


def counters(daemon: Daemon) -> dict[str, Any]:
    """The counters as the STATUS document has them."""
    doc: dict[str, Any] = msgspec.to_builtins(daemon.status().counters)
    return doc


def test_spec_lines_byte_exact_in_hour_directories(short_tmp: Path) -> None:
    """Each spec line is reproduced byte for byte, in the directory of its own UTC hour,
    in a file named after its first record's minute, second and millisecond."""
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [inputs for inputs, _ in SPEC_LINES])

    run(cfg, test)
    files = delivered_files(short_tmp)
    assert len(files) == 4
    by_dir = {str(p.parent.relative_to(short_tmp / "out")): p for p in files}
    assert sorted(by_dir) == [
        "test-endpoint/AllTraffic/2021/05/18/00",
        "test-endpoint/AllTraffic/2021/09/12/08",
        "test-endpoint/AllTraffic/2023/01/19/05",
        "test-endpoint/AllTraffic/2024/01/19/19",
    ]
    expected_names = {
        "2021/05/18/00": ("29", "02", "731"),
        "2021/09/12/08": ("03", "35", "500"),
        "2023/01/19/05": ("31", "46", "999"),
        "2024/01/19/19": ("27", "57", "000"),
    }
    for d, p in by_dir.items():
        m = FILE_NAME.fullmatch(p.name)
        assert m, p.name
        assert m.groups() == expected_names[d.split("/", 2)[2]]
    got = {line for p in files for line in p.read_text().splitlines()}
    assert got == {line for _, line in SPEC_LINES}
    for p in files:
        assert p.read_bytes().endswith(b"\n")


def test_records_in_two_hours_land_in_two_directories(short_tmp: Path) -> None:
    """Eight records a quarter of a second apart from 10:59:59 (fake time, the records' own
    time too): four in the 10 o'clock directory, four in the 11 o'clock one."""
    clock = FakeClock(wall=dt.datetime(2026, 3, 1, 10, 59, 59, tzinfo=UTC).timestamp())
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(8):  # 10:59:59 .. 11:00:00.75
                assert client.capture(**dict(csv_pair(i), inference_time=clock.wall()))
                clock.advance(0.25)
            assert await client.flush(timeout=10)

    run(cfg, test, clock)
    hours: dict[str, list[str]] = {}
    for p in delivered_files(short_tmp):
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            hours.setdefault(p.parent.name, []).append(rec["eventMetadata"]["inferenceTime"])
    assert sorted(hours) == ["10", "11"]
    assert set(hours["10"]) == {"2026-03-01T10:59:59Z"}
    assert len(hours["10"]) == 4 and len(hours["11"]) == 4


def test_variant_names_and_generated_event_ids(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            client.capture(b"1", b"2", request_content_type="text/csv", response_content_type="text/csv")
            client.capture(
                b"1",
                b"2",
                request_content_type="text/csv",
                response_content_type="text/csv",
                variant_name="Canary-2",
            )
            assert await client.flush()

    run(cfg, test)
    out = short_tmp / "out"
    variants = sorted(str(p.relative_to(out)).split("/")[1] for p in delivered_files(short_tmp))
    assert variants == ["AllTraffic", "Canary-2"]
    ids = [r["eventMetadata"]["eventId"] for r in delivered_lines(short_tmp)]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)


@pytest.mark.parametrize(("modes", "sides"), [("Input", {"endpointInput"}), ("Output", {"endpointOutput"})])
def test_capture_options_through_the_daemon(short_tmp: Path, modes: str, sides: set[str]) -> None:
    cfg = write_config(short_tmp, data_capture=capture_mode_config(short_tmp, modes))

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [csv_pair(i) for i in range(5)])

    run(cfg, test)
    lines = delivered_lines(short_tmp)
    assert len(lines) == 5
    assert all(set(r["captureData"]) == sides for r in lines)


def test_a_record_with_nothing_to_capture_is_counted_not_written(short_tmp: Path) -> None:
    """Output-only capture and records without a response (a request that failed, say): no line
    `"captureData":{}` is written; they are counted as `nothing_to_capture`, and the counters
    still add up. A batch of only such records and a mixed one both."""
    cfg = write_config(short_tmp, data_capture=capture_mode_config(short_tmp, "Output", header=False))

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(3):  # a batch of only such records
                assert client.capture(b"1,2", None, request_content_type="text/csv", inference_id=f"n{i}")
            assert await client.flush()
            for i in range(4):  # mixed
                body = None if i % 2 else b"0.5"
                assert client.capture(b"1,2", body, request_content_type="text/csv", inference_id=f"m{i}")
            assert await client.flush()
        assert counters(daemon) == {
            "received": 7,
            "written": 2,
            "dropped": {"nothing_to_capture": 5},
            "resent": 0,
        }

    run(cfg, test)
    lines = delivered_lines(short_tmp)
    assert sorted(r["eventMetadata"]["inferenceId"] for r in lines) == ["m0", "m2"]
    assert all(r["captureData"] for r in lines)


def test_without_content_type_header_everything_is_base64(short_tmp: Path) -> None:
    cfg = write_config(short_tmp, data_capture=capture_mode_config(short_tmp, "InputAndOutput", header=False))

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [csv_pair(1)])

    run(cfg, test)
    (rec,) = delivered_lines(short_tmp)
    assert rec["captureData"]["endpointInput"]["encoding"] == "BASE64"
    assert rec["captureData"]["endpointOutput"]["encoding"] == "BASE64"


@pytest.mark.parametrize("percentage", [0, 20, 100])
def test_sampling(short_tmp: Path, percentage: int) -> None:
    """`--sampling-percentage` (an override of the config file's 100) decides what is written."""
    n = 5000
    cfg = write_config(short_tmp, overrides=Overrides(sampling_percentage=percentage))
    seen: dict[str, Any] = {}

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [csv_pair(i) for i in range(n)])
        status = msgspec.to_builtins(daemon.status())
        assert status["CurrentSamplingPercentage"] == percentage
        seen.update(status["counters"])
        assert seen["received"] == n
        assert seen["written"] + seen["dropped"].get("sampled_out", 0) == n

    run(cfg, test)
    lines = delivered_lines(short_tmp)
    written = len(lines)
    assert written == seen["written"]
    if percentage == 0:
        assert written == 0
    elif percentage == 100:
        assert written == n
    else:  # Binomial(5000, 0.2): sd 28.3; six sd either side
        assert abs(written - 1000) < 170
        # a request's input and output are kept or dropped together
        assert all(set(r["captureData"]) == {"endpointInput", "endpointOutput"} for r in lines)


def test_enable_capture_false_keeps_accepting_and_counting(short_tmp: Path) -> None:
    cfg = write_config(
        short_tmp,
        data_capture="[DataCaptureConfig]\nEnableCapture = false\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{short_tmp / "out"}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n',
    )

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [csv_pair(i) for i in range(10)])
        status = msgspec.to_builtins(daemon.status())
        assert status["EnableCapture"] is False and status["CaptureStatus"] == "Stopped"
        assert status["counters"] == {
            "received": 10,
            "written": 0,
            "dropped": {"capture_disabled": 10},
            "resent": 0,
        }

    run(cfg, test)
    assert delivered_files(short_tmp) == []


def test_status_json_matches_what_was_sent(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`captured status --json` and `captured status --config` (the command line's own code, run
    in a thread so that the daemon on this loop answers it) tell what was sent."""
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            await capture_all(client, [csv_pair(i) for i in range(42)])
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["status", "--socket", cfg.socket_path, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["EnableCapture"] is True
        assert doc["CaptureStatus"] == "Started"
        assert doc["CurrentSamplingPercentage"] == 100
        assert doc["DestinationS3Uri"] == f"file://{short_tmp / 'out'}"
        assert doc["counters"] == {"received": 42, "written": 42, "dropped": {}, "resent": 0}
        config_path = str(short_tmp / "captured.toml")
        assert await asyncio.to_thread(cli.main, ["status", "--config", config_path]) == 0
        text = capsys.readouterr().out
        assert "CaptureStatus       Started" in text and "received 42, written 42" in text
        assert re.search(r"disk {16}\d+\.\d% used, .* GB free \(stops at 75%, starts again at 70%", text)
        assert "clients             " in text and f"version {doc['version']}" in text
        for key in ("KmsKeyId", "watermark", "delivery", "ingest", "uptime_s", "version", "spool"):
            assert key in doc
        assert doc["watermark"]["capturing"] is True and doc["delivery"]["files_waiting"] >= 0

    run(cfg, test)


def test_flush_confirms_processing(short_tmp: Path) -> None:
    """After flush() returns True the daemon's counters already include every record."""
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(3000):
                client.capture(**csv_pair(i))
            assert await client.flush(timeout=10)
            assert daemon.status().counters.written == 3000
            stats = client.stats()
            assert stats["captured"] == stats["sent"] == stats["acknowledged"] == 3000
            assert stats["dropped"] == {}
        # the .part file already holds the lines (exactly what will be delivered)
        part = b"".join(p.read_bytes() for p in (short_tmp / "spool").glob("*.part"))
        assert part.count(b"\n") == 3000

    run(cfg, test)


def test_records_with_a_wrong_schema_are_refused_one_by_one(short_tmp: Path) -> None:
    good = [b"1,2", b"3", "text/csv", "text/csv", 1700000000.0, None, "ok-1", None, None]
    bad_type = [123, b"3", "text/csv", "text/csv", 1700000000.0]
    bad_variant = [b"1", b"3", "text/csv", "text/csv", 1700000000.0, None, None, None, "../../etc"]
    bad_time = [b"1", b"3", "text/csv", "text/csv", float("nan")]
    too_long_id = [b"1", b"3", "text/csv", "text/csv", 1700000000.0, None, "x" * 65]
    payload = msgspec.msgpack.encode([good, bad_type, bad_variant, bad_time, too_long_id])
    cfg = write_config(short_tmp)

    def send() -> None:  # blocking socket code: in a thread, while the loop runs the daemon
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(cfg.socket_path)
            s.sendall(frames.frame(frames.Kind.BATCH, payload) + frames.encode_frame(frames.Kind.FLUSH, (1,)))
            reader = frames.FrameReader()
            acks = wait_for(lambda: reader.feed(s.recv(4096)))
            assert frames.ack_decoder.decode(acks[0][1]) == frames.Ack(1, 5)

    async def test(daemon: Daemon) -> None:
        await asyncio.to_thread(send)
        assert counters(daemon) == {
            "received": 5,
            "written": 1,
            "dropped": {"invalid_record": 4},
            "resent": 0,
        }

    run(cfg, test)
    assert [r["eventMetadata"]["inferenceId"] for r in delivered_lines(short_tmp)] == ["ok-1"]
    assert not (short_tmp / "out" / "test-endpoint" / "..").resolve().joinpath("etc").exists()


def send_and_read_error(socket_path: str, data: bytes) -> str:
    """Connect, send `data`, and return the daemon's ERROR text (blocking: run it in a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        s.sendall(data)
        return read_error(s)


def test_frames_before_a_bad_header_in_the_same_read_still_count(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        data = raw_records(10) + b"XX" + os.urandom(64)
        assert "bad magic" in await asyncio.to_thread(send_and_read_error, cfg.socket_path, data)
        assert daemon.status().counters.written == 10

    run(cfg, test)


def test_deeply_nested_payload_is_a_counted_protocol_error(short_tmp: Path) -> None:
    nested = b"\x91" * 200_000 + b"\xc0"  # msgpack: arrays inside arrays
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        data = frames.frame(frames.Kind.BATCH, nested)
        assert "undecodable" in await asyncio.to_thread(send_and_read_error, cfg.socket_path, data)
        assert sum(daemon.status().ingest.connections_closed.values()) == 1

    run(cfg, test)


@pytest.mark.parametrize(
    ("garbage", "reason", "message"),
    [
        (os.urandom(4096), "bad_header", "bad magic"),
        (b"CP\x03\x01\x00\x00\x00\x02\x90\x90", "unsupported_version", "version 3 is not supported"),
        (b"CP\x01\x01\xff\x00\x00\x00", "frame_too_large", "exceeds the maximum"),
        (frames.frame(frames.Kind.BATCH, b"\xc1\xc1"), "bad_payload", "not an array"),
        (frames.frame(frames.Kind.ACK, b"\x90"), "unexpected_kind", "may not send"),
    ],
)
def test_protocol_violations_close_only_that_connection(
    short_tmp: Path, garbage: bytes, reason: str, message: str
) -> None:
    cfg = write_config(short_tmp)

    async def test(daemon: Daemon) -> None:
        async with AsyncCaptureClient(cfg.socket_path) as good:
            good.capture(**csv_pair(1))
            assert await good.flush()
            assert message in await asyncio.to_thread(send_and_read_error, cfg.socket_path, garbage)
            good.capture(**csv_pair(2))
            assert await good.flush()
            status = daemon.status()
            assert status.ingest.connections_closed == {reason: 1}
            assert status.counters.written == 2

    run(cfg, test)
