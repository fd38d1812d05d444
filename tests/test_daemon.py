"""End to end: the real client -> a real daemon subprocess -> files in the file:// destination."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.service.cli import query_status
from captured.testing.daemon import DaemonProcess, read_error, wait_for
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


def csv_pair(i: int) -> dict[str, Any]:
    return dict(
        request_body=f"{i},0,159.3,66\n".encode(),
        response_body=b"0.5",
        request_content_type="text/csv",
        response_content_type="text/csv",
        inference_id=str(i),
    )


def capture_all(d: DaemonProcess, records: list[dict[str, Any]]) -> CaptureClient:
    client = CaptureClient(d.socket_path)
    for r in records:
        body = {k: v for k, v in r.items() if k not in ("request_body", "response_body")}
        assert client.capture(r["request_body"], r["response_body"], **body)
    assert client.flush(timeout=10)
    return client


def test_spec_lines_byte_exact_in_hour_directories(daemon: DaemonProcess) -> None:
    """Each spec line is reproduced byte for byte, in the directory of its own UTC hour,
    in a file named after its first record's minute, second and millisecond."""
    client = capture_all(daemon, [inputs for inputs, _ in SPEC_LINES])
    client.close()
    assert daemon.stop() == 0
    files = daemon.delivered_files()
    assert len(files) == 4
    by_dir = {str(p.parent.relative_to(daemon.out_dir)): p for p in files}
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


def test_records_in_two_hours_land_in_two_directories(daemon: DaemonProcess) -> None:
    base = dt.datetime(2026, 3, 1, 10, 59, 59, tzinfo=UTC).timestamp()
    records = [dict(csv_pair(i), inference_time=base + i * 0.25) for i in range(8)]  # 10:59:59 .. 11:00:00.75
    capture_all(daemon, records).close()
    assert daemon.stop() == 0
    hours: dict[str, list[str]] = {}
    for p in daemon.delivered_files():
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            hours.setdefault(p.parent.name, []).append(rec["eventMetadata"]["inferenceTime"])
    assert sorted(hours) == ["10", "11"]
    assert set(hours["10"]) == {"2026-03-01T10:59:59Z"}
    assert len(hours["10"]) == 4 and len(hours["11"]) == 4


def test_variant_names_and_generated_event_ids(daemon: DaemonProcess) -> None:
    client = CaptureClient(daemon.socket_path)
    client.capture(b"1", b"2", request_content_type="text/csv", response_content_type="text/csv")
    client.capture(
        b"1", b"2", request_content_type="text/csv", response_content_type="text/csv", variant_name="Canary-2"
    )
    assert client.flush()
    client.close()
    daemon.stop()
    variants = sorted(str(p.relative_to(daemon.out_dir)).split("/")[1] for p in daemon.delivered_files())
    assert variants == ["AllTraffic", "Canary-2"]
    ids = [r["eventMetadata"]["eventId"] for r in daemon.delivered_lines()]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)


@pytest.mark.parametrize(("modes", "sides"), [("Input", {"endpointInput"}), ("Output", {"endpointOutput"})])
def test_capture_options_through_the_daemon(daemon_factory: Any, modes: str, sides: set[str]) -> None:
    d: DaemonProcess = daemon_factory()
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{d.out_dir}"\n'
        f'CaptureOptions = [{{ CaptureMode = "{modes}" }}]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    d.start()
    capture_all(d, [csv_pair(i) for i in range(5)]).close()
    d.stop()
    lines = d.delivered_lines()
    assert len(lines) == 5
    assert all(set(r["captureData"]) == sides for r in lines)


def test_a_record_with_nothing_to_capture_is_counted_not_written(daemon_factory: Any) -> None:
    """Output-only capture and records without a response (a request that failed, say): no line
    `"captureData":{}` is written; they are counted as `nothing_to_capture`, and the counters
    still add up. A batch of only such records and a mixed one both."""
    d: DaemonProcess = daemon_factory()
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{d.out_dir}"\n'
        'CaptureOptions = [{ CaptureMode = "Output" }]\n'
    )
    d.start()
    with CaptureClient(d.socket_path) as client:
        for i in range(3):  # a batch of only such records
            assert client.capture(b"1,2", None, request_content_type="text/csv", inference_id=f"n{i}")
        assert client.flush()
        for i in range(4):  # mixed
            body = None if i % 2 else b"0.5"
            assert client.capture(b"1,2", body, request_content_type="text/csv", inference_id=f"m{i}")
        assert client.flush()
    counters = d.status()["counters"]
    assert counters == {"received": 7, "written": 2, "dropped": {"nothing_to_capture": 5}, "resent": 0}
    d.stop()
    lines = d.delivered_lines()
    assert sorted(r["eventMetadata"]["inferenceId"] for r in lines) == ["m0", "m2"]
    assert all(r["captureData"] for r in lines)


def test_without_content_type_header_everything_is_base64(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{d.out_dir}"\n'
        'CaptureOptions = [{ CaptureMode = "InputAndOutput" }]\n'
    )
    d.start()
    capture_all(d, [csv_pair(1)]).close()
    d.stop()
    (rec,) = d.delivered_lines()
    assert rec["captureData"]["endpointInput"]["encoding"] == "BASE64"
    assert rec["captureData"]["endpointOutput"]["encoding"] == "BASE64"


@pytest.mark.parametrize("percentage", [0, 20, 100])
def test_sampling(daemon_factory: Any, percentage: int) -> None:
    n = 5000
    d: DaemonProcess = daemon_factory(args=("--sampling-percentage", str(percentage)))
    d.start()
    capture_all(d, [csv_pair(i) for i in range(n)]).close()
    status = d.status()
    assert status["CurrentSamplingPercentage"] == percentage
    counters = status["counters"]
    assert counters["received"] == n
    assert counters["written"] + counters["dropped"].get("sampled_out", 0) == n
    d.stop()
    written = len(d.delivered_lines())
    assert written == counters["written"]
    if percentage == 0:
        assert written == 0
    elif percentage == 100:
        assert written == n
    else:  # Binomial(5000, 0.2): sd 28.3; six sd either side
        assert abs(written - 1000) < 170
        # a request's input and output are kept or dropped together
        assert all(set(r["captureData"]) == {"endpointInput", "endpointOutput"} for r in d.delivered_lines())


def test_enable_capture_false_keeps_accepting_and_counting(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    d.write_config(
        "[DataCaptureConfig]\nEnableCapture = false\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{d.out_dir}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
    )
    d.start()
    capture_all(d, [csv_pair(i) for i in range(10)]).close()
    status = d.status()
    assert status["EnableCapture"] is False and status["CaptureStatus"] == "Stopped"
    assert status["counters"] == {
        "received": 10,
        "written": 0,
        "dropped": {"capture_disabled": 10},
        "resent": 0,
    }
    d.stop()
    assert d.delivered_files() == []


def test_status_json_matches_what_was_sent(daemon: DaemonProcess) -> None:
    capture_all(daemon, [csv_pair(i) for i in range(42)]).close()
    out = subprocess.run(
        [sys.executable, "-m", "captured", "status", "--socket", daemon.socket_path, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["EnableCapture"] is True
    assert doc["CaptureStatus"] == "Started"
    assert doc["CurrentSamplingPercentage"] == 100
    assert doc["DestinationS3Uri"] == f"file://{daemon.out_dir}"
    assert doc["counters"] == {"received": 42, "written": 42, "dropped": {}, "resent": 0}
    text = subprocess.run(
        [sys.executable, "-m", "captured", "status", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CaptureStatus       Started" in text and "received 42, written 42" in text
    assert re.search(r"disk {16}\d+\.\d% used, .* GB free \(stops at 75%, starts again at 70%", text)
    assert "clients             " in text and f"version {doc['version']}" in text
    for key in ("KmsKeyId", "watermark", "delivery", "ingest", "uptime_s", "version", "spool"):
        assert key in doc
    assert doc["watermark"]["capturing"] is True and doc["delivery"]["files_waiting"] >= 0


def test_flush_confirms_processing(daemon: DaemonProcess) -> None:
    """After flush() returns True the daemon's counters already include every record."""
    client = CaptureClient(daemon.socket_path)
    for i in range(3000):
        client.capture(**csv_pair(i))
    assert client.flush(timeout=10)
    assert daemon.status()["counters"]["written"] == 3000
    stats = client.stats()
    assert stats["captured"] == stats["sent"] == stats["acknowledged"] == 3000
    assert stats["dropped"] == {}
    client.close()
    # the .part file already holds the lines (exactly what will be delivered)
    part = b"".join(p.read_bytes() for p in daemon.spool_dir.glob("*.part"))
    assert part.count(b"\n") == 3000


def test_client_without_daemon_never_blocks_or_raises(short_tmp: Path) -> None:
    client = CaptureClient(str(short_tmp / "absent.sock"), buffer_bytes=64 * 1024)
    results = [client.capture(**csv_pair(i)) for i in range(5000)]
    stats = client.stats()
    assert stats["captured"] == 5000
    assert results.count(False) == stats["dropped"]["buffer_full"] > 0
    assert stats["acknowledged"] == 0
    assert client.flush(timeout=0.2) is False
    client.close(timeout=0.2)
    assert client.capture(**csv_pair(0)) is False
    assert client.stats()["dropped"]["closed"] >= 1


def test_client_reconnects_after_a_daemon_restart(daemon: DaemonProcess) -> None:
    client = CaptureClient(daemon.socket_path, reconnect_max_s=0.2)
    capture_all_into = [client.capture(**csv_pair(i)) for i in range(10)]
    assert all(capture_all_into) and client.flush()
    daemon.stop()
    daemon.start()
    client.capture(**csv_pair(10))
    wait_for(lambda: client.flush(timeout=1.0), timeout=15)
    client.close()
    assert daemon.status()["counters"]["written"] >= 1
    daemon.stop()
    ids = sorted(int(r["eventMetadata"]["inferenceId"]) for r in daemon.delivered_lines())
    assert ids[:10] == list(range(10)) and ids[-1] == 10


def _raw_records(n: int, start: int = 0) -> bytes:
    from captured.client.record import batch_frames, prepare_record

    recs = [
        prepare_record(f"{i},1\n", "0", "text/csv", "text/csv", str(i), None, None, None, None, 1 << 20)
        for i in range(start, start + n)
    ]
    return b"".join(f for f, _ in batch_frames([r for r, _ in recs], [s for _, s in recs], 16 * 1024))


def test_shutdown_drains_what_clients_sent(daemon: DaemonProcess) -> None:
    """Frames already written to the socket when SIGTERM arrives are read, written, sealed and
    delivered before the daemon exits 0; nothing is left in the spool."""
    n = 20000
    data = _raw_records(n)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(data[: len(data) // 2])
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        s.sendall(data[len(data) // 2 :])
        assert daemon.proc.wait(30) == 0  # type: ignore[union-attr]
    assert len(daemon.delivered_lines()) == n
    assert set(os.listdir(daemon.spool_dir)) == {".lock", ".journal"}
    assert "stopped: received 20000, written 20000" in daemon.log()


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
    daemon: DaemonProcess, garbage: bytes, reason: str, message: str
) -> None:
    good = CaptureClient(daemon.socket_path)
    good.capture(**csv_pair(1))
    assert good.flush()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.connect(daemon.socket_path)
        bad.sendall(garbage)
        assert message in read_error(bad)
    good.capture(**csv_pair(2))
    assert good.flush()
    status = daemon.status()
    assert status["ingest"]["connections_closed"] == {reason: 1}
    assert status["counters"]["written"] == 2
    good.close()


def test_records_with_a_wrong_schema_are_refused_one_by_one(daemon: DaemonProcess) -> None:
    import msgspec

    good = [b"1,2", b"3", "text/csv", "text/csv", 1700000000.0, None, "ok-1", None, None]
    bad_type = [123, b"3", "text/csv", "text/csv", 1700000000.0]
    bad_variant = [b"1", b"3", "text/csv", "text/csv", 1700000000.0, None, None, None, "../../etc"]
    bad_time = [b"1", b"3", "text/csv", "text/csv", float("nan")]
    too_long_id = [b"1", b"3", "text/csv", "text/csv", 1700000000.0, None, "x" * 65]
    payload = msgspec.msgpack.encode([good, bad_type, bad_variant, bad_time, too_long_id])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(frames.frame(frames.Kind.BATCH, payload) + frames.encode_frame(frames.Kind.FLUSH, (1,)))
        reader = frames.FrameReader()
        acks = wait_for(lambda: reader.feed(s.recv(4096)))
        assert frames.ack_decoder.decode(acks[0][1]) == frames.Ack(1, 5)
    counters = daemon.status()["counters"]
    assert counters == {"received": 5, "written": 1, "dropped": {"invalid_record": 4}, "resent": 0}
    daemon.stop()
    assert [r["eventMetadata"]["inferenceId"] for r in daemon.delivered_lines()] == ["ok-1"]
    assert not (daemon.out_dir / "test-endpoint" / "..").resolve().joinpath("etc").exists()


def test_a_crashed_run_is_recovered_at_start(daemon_factory: Any) -> None:
    """A `.part` file with a torn last line, left by a killed daemon, is cut to whole lines,
    sealed and delivered by the next start."""
    d: DaemonProcess = daemon_factory()
    d.start()
    capture_all(d, [csv_pair(i) for i in range(100)]).close()
    d.stop(signal.SIGKILL)
    (part,) = d.spool_dir.glob("*.jsonl.part")
    with open(part, "ab") as fh:
        fh.write(b'{"captureData":{"endpointIn')
    d.start()
    wait_for(lambda: len(d.delivered_lines()) == 100)
    d.stop()
    assert [int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()] == list(range(100))
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_records_acknowledged_by_flush_survive_sigkill_and_torn_sealed_files_are_cut(
    daemon_factory: Any,
) -> None:
    """Everything flush() confirmed is delivered after a SIGKILL and a restart. A sealed file
    whose end was lost (as a power loss can leave one written since the last flush) is cut back to
    its last complete line at start, never delivered torn."""
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 3600\n")
    d.start()
    capture_all(d, [csv_pair(i) for i in range(300)]).close()  # flush()ed inside
    d.stop(signal.SIGKILL)
    (part,) = d.spool_dir.glob("*.jsonl.part")
    sealed = part.with_name(part.name[: -len(".part")])
    part.rename(sealed)  # as if it had been sealed just before the power went
    with open(sealed, "r+b") as fh:
        fh.truncate(sealed.stat().st_size - 10)
    d.start()
    wait_for(lambda: len(d.delivered_lines()) == 299)
    d.stop()
    assert [int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()] == list(range(299))
    assert "its end was torn" in d.log()


def test_embedded_default_runs_without_any_config(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "captured", "serve"], cwd=short_tmp, env=env, stderr=subprocess.PIPE, text=True
    )
    sock = short_tmp / "captured-data" / "capture.sock"
    try:
        wait_for(lambda: sock.exists() and query_status(str(sock)), timeout=15)
        with CaptureClient(str(sock)) as client:
            client.capture(b"1,2", b"0", request_content_type="text/csv", response_content_type="text/csv")
            assert client.flush()
        status = query_status(str(sock))
        assert status["EndpointName"] == "local-endpoint"
        assert status["CurrentSamplingPercentage"] == 100
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert str(sock) in err and str(short_tmp / "captured-data" / "out") in err
    (f,) = (short_tmp / "captured-data" / "out" / "local-endpoint" / "AllTraffic").rglob("*.jsonl")
    rec = json.loads(f.read_text())
    assert rec["captureData"]["endpointInput"]["encoding"] == "CSV"


def test_serve_refuses_an_invalid_config_before_doing_anything(short_tmp: Path) -> None:
    cfg = short_tmp / "bad.toml"
    cfg.write_text(
        f'endpoint_name = "bad_name"\nsocket_path = "{short_tmp}/s.sock"\n'
        "[DataCaptureConfig]\nInitialSamplingPercentage = 101\n"
        'DestinationS3Uri = "https://bucket.s3.amazonaws.com/x"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "captured", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    problems = out.stderr.strip().splitlines()
    assert len(problems) == 3
    assert any("endpoint_name" in p and "bad_name" in p for p in problems)
    assert any("InitialSamplingPercentage" in p and "101" in p for p in problems)
    assert any("DestinationS3Uri" in p and "s3://" in p for p in problems)
    assert not (short_tmp / "s.sock").exists()


def test_check_prints_the_effective_configuration(short_tmp: Path) -> None:
    dcc = short_tmp / "endpoint-config.json"
    dcc.write_text(
        json.dumps(
            {
                "EndpointConfigName": "churn-config",
                "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m"}],
                "DataCaptureConfig": {
                    "EnableCapture": True,
                    "InitialSamplingPercentage": 20,
                    "DestinationS3Uri": "s3://my-bucket/datacapture/",
                    "CaptureOptions": [{"CaptureMode": "REQUEST"}, {"CaptureMode": "RESPONSE"}],
                    "CaptureContentTypeHeader": {"CsvContentTypes": ["text/csv"]},
                },
            }
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "captured",
            "check",
            "--data-capture-config",
            str(dcc),
            "--socket",
            str(short_tmp / "x.sock"),
            "--spool-dir",
            str(short_tmp / "spool"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=short_tmp,
    )
    assert out.returncode == 0, out.stderr
    assert "InitialSamplingPercentage = 20" in out.stdout
    assert "s3://my-bucket/datacapture/" in out.stdout
    assert 'CaptureMode = "Input"' in out.stdout and 'CaptureMode = "Output"' in out.stdout
    assert not (short_tmp / "spool").exists()  # check changes nothing


def test_a_stalled_daemon_never_blocks_the_caller(daemon: DaemonProcess) -> None:
    """SIGSTOP the daemon: capture() keeps returning, the bounded buffer drops and counts; after
    SIGCONT everything that was buffered is delivered and flush() confirms it."""
    client = CaptureClient(daemon.socket_path, buffer_bytes=256 * 1024)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        results = [client.capture(**csv_pair(i)) for i in range(30000)]
        assert client.flush(timeout=0.2) is False
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    stats = client.stats()
    dropped = stats["dropped"].get("buffer_full", 0)
    assert dropped == results.count(False) > 0
    assert wait_for(lambda: client.flush(timeout=2.0), timeout=30)
    stats = client.stats()
    assert stats["acknowledged"] == stats["captured"] - dropped == results.count(True)
    assert daemon.status()["counters"]["written"] == results.count(True)
    client.close()


def test_the_sample_service_config_is_valid(short_tmp: Path) -> None:
    """Every value of the shipped file is valid. `check` also looks at this host, where the
    service's paths (/run/captured, /var/lib/captured) need not be creatable by whoever runs the
    tests: those three are pointed at a scratch directory, and the file says the rest."""
    sample = Path(__file__).resolve().parent.parent / "systemd" / "captured.toml"
    host = ["--socket", str(short_tmp / "c.sock"), "--spool-dir", str(short_tmp / "spool")]
    host += ["--destination", f"file://{short_tmp / 'out'}"]
    out = subprocess.run(
        [sys.executable, "-m", "captured", "check", "--config", str(sample), *host],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_a_second_daemon_on_the_same_socket_refuses_to_start(
    daemon: DaemonProcess, daemon_factory: Any
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "captured", "serve", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "another daemon is using the spool" in out.stderr
    assert daemon.status()["CaptureStatus"] == "Started"  # the first one is untouched


def test_a_stale_socket_file_is_replaced(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket_path)
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    d.start()
    assert d.status()["CaptureStatus"] == "Started"


def test_second_sigint_exits_at_once(daemon: DaemonProcess) -> None:
    """First SIGINT starts a graceful shutdown, which keeps draining while a client keeps
    sending; a second SIGINT ends the process at once with status 130."""
    import threading

    frame = _raw_records(200)
    stop = threading.Event()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket_path)

    def keep_sending() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                s.sendall(frame)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        assert daemon.proc is not None
        wait_for(lambda: daemon.status()["counters"]["received"] > 0)
        daemon.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "shutting down" in daemon.log())
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 130
    finally:
        stop.set()
        s.close()
        sender.join(5)


def test_frames_before_a_bad_header_in_the_same_read_still_count(daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(_raw_records(10) + b"XX" + os.urandom(64))
        assert "bad magic" in read_error(s)
    assert daemon.status()["counters"]["written"] == 10


def test_deeply_nested_payload_is_a_counted_protocol_error(daemon: DaemonProcess) -> None:
    nested = b"\x91" * 200_000 + b"\xc0"  # msgpack: arrays inside arrays
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(frames.frame(frames.Kind.BATCH, nested))
        assert "undecodable" in read_error(s)
    status = daemon.status()
    assert sum(status["ingest"]["connections_closed"].values()) == 1


def test_data_sent_just_after_sigterm_on_an_idle_connection_is_kept(daemon: DaemonProcess) -> None:
    """A connection idle for a while before SIGTERM still gets its drain window."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        wait_for(lambda: daemon.status()["ingest"]["connections"] == 2)  # ours + the status query
        import time

        time.sleep(0.3)  # idle longer than the drain's quiet period
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        s.sendall(_raw_records(50))
        assert daemon.proc.wait(30) == 0
    assert len(daemon.delivered_lines()) == 50


def test_two_daemons_never_share_a_spool(daemon: DaemonProcess, short_tmp: Path) -> None:
    """A second daemon on the same spool (another socket) refuses to start and leaves the first
    daemon's open file alone."""
    capture_all(daemon, [csv_pair(i) for i in range(5)]).close()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "captured",
            "serve",
            "--config",
            str(daemon.config_path),
            "--socket",
            str(short_tmp / "other.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "another daemon is using the spool" in out.stderr
    assert len(list(daemon.spool_dir.glob("*.jsonl.part"))) == 1
    assert daemon.stop() == 0
    assert len(daemon.delivered_lines()) == 5


def test_kill_9_at_random_moments_loses_no_acknowledged_record_and_tears_no_line(
    daemon_factory: Any,
) -> None:
    """Five times: a client captures in a loop (flushing every 200 records), the daemon is killed
    with SIGKILL at a random moment and started again. In the end every line delivered parses,
    no record is delivered twice, every record a flush() confirmed is there, and so is every
    record capture() accepted (the client sent again what was not acknowledged); the client
    resumed on its own after each restart."""
    import random
    import threading

    rng = random.Random(7)
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 0.3\n")
    d.start()
    confirmed: set[int] = set()
    accepted: list[int] = []
    stop = threading.Event()

    def capture_loop() -> None:
        client = CaptureClient(d.socket_path, reconnect_max_s=0.1)
        i = 0
        pending: list[int] = []
        while not stop.is_set():
            if client.capture(**csv_pair(i)):
                pending.append(i)
                accepted.append(i)
            i += 1
            if len(pending) >= 200:
                if client.flush(timeout=2):
                    confirmed.update(pending)
                pending = []
        if client.flush(timeout=5):
            confirmed.update(pending)
        client.close()

    thread = threading.Thread(target=capture_loop)
    thread.start()
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.2, 0.8))
            d.stop(signal.SIGKILL)
            d.start()
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    assert d.stop() == 0
    ids = []
    for path in d.delivered_files():
        for raw in path.read_bytes().splitlines(keepends=True):
            assert raw.endswith(b"\n")
            ids.append(int(json.loads(raw)["eventMetadata"]["inferenceId"]))
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert confirmed and confirmed <= set(ids)
    assert sorted(ids) == accepted
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_a_task_that_fails_of_a_bug_ends_the_daemon_loudly_and_loses_nothing(daemon_factory: Any) -> None:
    """A long-lived task dies of a bug (here the tick's spool rotation raises, injected into a
    real `captured serve` process): the daemon does not go on half-alive, it logs the traceback
    at CRITICAL and exits 70 (systemd's Restart=on-failure restarts it). The records it had
    acknowledged are in the spool, and the next start recovers and delivers every one."""
    d = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 3600\n")
    d.write_config()
    boom = d.root / "boom"
    code = (
        "import os, sys\n"
        "from captured.daemon.spool import Spool\n"
        "tick = Spool.tick\n"
        "def failing_tick(self):\n"
        f"    if os.path.exists({str(boom)!r}):\n"
        "        raise RuntimeError('injected: a bug in a long-lived task')\n"
        "    return tick(self)\n"
        "Spool.tick = failing_tick\n"
        "from captured.service.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(d.config_path)!r}]))\n"
    )
    log = open(d.stderr_path, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
    try:
        wait_for(lambda: os.path.exists(d.socket_path) and d.status(), timeout=15)
        with CaptureClient(d.socket_path) as client:
            for i in range(50):
                assert client.capture(f"{i}\n", None, request_content_type="text/csv", inference_id=str(i))
            assert client.flush(timeout=10)
        boom.touch()
        assert proc.wait(timeout=15) == 70
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = d.log()
    assert "CRITICAL" in text and "the daemon failed and stops" in text
    assert "RuntimeError: injected: a bug in a long-lived task" in text
    d.start()
    d.stop()
    assert sorted(int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()) == list(range(50))
