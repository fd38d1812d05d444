"""`captured.read` and `captured read`: captures read back identical to what was captured.

The daemon (in the test's loop) writes real captures from real clients: several endpoints and
variants, two hours, CSV, JSON, BASE64 text and binary bodies, to a local directory and to the
moto S3 server, plain and zstd. The reader must give back exactly what the clients sent, in key
order; SageMaker's own sample lines must read back with their documented values; selection by
time, endpoint, variant and inference id; bad data reported, never a crash.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard

import captured
from captured.client.aio import AsyncCaptureClient
from captured.reader import Capture, batch
from captured.reader.layout import Selection
from captured.reader.lint import Stats
from captured.reader.sources import open_source
from captured.reader.stream import captures
from captured.service.config import Config, load_config
from captured.testing.data import SAGEMAKER_SAMPLES
from captured.testing.inprocess import FakeClock, run_daemon
from captured.testing.s3 import S3Sandbox

T0 = dt.datetime(2024, 6, 1, 12, 30, tzinfo=dt.UTC)


def endpoints_config(root: Path, destination: str, compression: str = "none") -> Config:
    """Two endpoints: churn (CSV and JSON as text) and fraud (no content types: all BASE64)."""
    path = root / "captured.toml"
    path.write_text(
        f'socket_path = "{root / "c.sock"}"\nspool_dir = "{root / "spool"}"\n'
        f'[delivery]\ncompression = "{compression}"\n'
        '[[endpoints]]\nendpoint_name = "churn"\n[endpoints.DataCaptureConfig]\n'
        f'InitialSamplingPercentage = 100\nDestinationS3Uri = "{destination}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        "[endpoints.DataCaptureConfig.CaptureContentTypeHeader]\n"
        'CsvContentTypes = ["text/csv"]\nJsonContentTypes = ["application/json"]\n'
        '[[endpoints]]\nendpoint_name = "fraud"\n[endpoints.DataCaptureConfig]\n'
        f'InitialSamplingPercentage = 100\nDestinationS3Uri = "{destination}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
    )
    return load_config(str(path))


def sent_records() -> list[dict[str, Any]]:
    """What the clients capture: endpoint, variant, hour, bodies of every kind."""
    out = []
    for i in range(40):
        when = T0 + dt.timedelta(minutes=i * 2)  # 12:30 .. 13:48: two hours
        endpoint = "churn" if i % 2 else "fraud"
        variant = "Shadow" if i % 5 == 0 else None
        if i % 4 == 0:
            req, req_type, resp, resp_type = f"{i},1.5".encode(), "text/csv", b"0.5\n", "text/csv"
        elif i % 4 == 1:
            req, req_type = json.dumps({"x": i}).encode(), "application/json"
            resp, resp_type = json.dumps({"score": i / 10}).encode(), "application/json"
        elif i % 4 == 2:
            req, req_type, resp, resp_type = (
                bytes([i, 0, 255, 128]),
                "application/octet-stream",
                b"\x00\x01",
                None,
            )
        else:
            req, req_type, resp, resp_type = "héllo".encode(), "text/plain", b"ok", "text/html"
        out.append(dict(endpoint=endpoint, variant=variant, when=when, id=f"id-{i}", req=req, req_type=req_type,
                        resp=resp, resp_type=resp_type, attrs=f"a={i}" if i % 3 == 0 else None))  # fmt: skip
    return out


async def capture_all(socket_path: str, records: list[dict[str, Any]]) -> None:
    async with AsyncCaptureClient(socket_path) as client:
        for r in records:
            assert client.capture(
                r["req"], r["resp"], request_content_type=r["req_type"], response_content_type=r["resp_type"],
                inference_id=r["id"], custom_attributes=r["attrs"], variant_name=r["variant"],
                inference_time=r["when"], endpoint_name=r["endpoint"],
            )  # fmt: skip
        assert await client.flush(timeout=10)


def write_captures(root: Path, destination: str, compression: str = "none") -> list[dict[str, Any]]:
    cfg = endpoints_config(root, destination, compression)
    records = sent_records()

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock(wall=(T0 + dt.timedelta(hours=2)).timestamp())):
            await capture_all(cfg.socket_path, records)

    asyncio.run(main())
    return records


def same(c: Capture, r: dict[str, Any]) -> None:
    """One capture read back equals what was sent."""
    assert (c.endpoint, c.variant, c.inference_id) == (r["endpoint"], r["variant"] or "AllTraffic", r["id"])
    assert c.inference_time == r["when"].replace(microsecond=0) and c.custom_attributes == r["attrs"]
    assert c.input is not None and c.output is not None
    assert (c.input.content_type, c.input.data) == (r["req_type"], r["req"])
    assert (c.output.content_type, c.output.data) == (r["resp_type"], r["resp"])
    text = {"text/csv": "CSV", "application/json": "JSON"} if c.endpoint == "churn" else {}
    assert c.input.encoding == text.get(r["req_type"], "BASE64")
    assert c.input.binary == (r["req"] == bytes([int(r["id"][3:]), 0, 255, 128]))
    if c.input.encoding == "JSON":
        assert c.input.json() == json.loads(r["req"])
    if not c.input.binary:
        assert c.input.text() == r["req"].decode()


def check_all(found: list[Capture], records: list[dict[str, Any]]) -> None:
    by_id = {r["id"]: r for r in records}
    assert sorted(c.inference_id or "" for c in found) == sorted(by_id)
    for c in found:
        same(c, by_id[c.inference_id or ""])
    keys = [c.key for c in found]
    assert keys == sorted(keys)  # key order, then line order within a file
    assert all(c.key.endswith(".jsonl.zst" if ".zst" in keys[0] else ".jsonl") for c in found)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_local_captures_read_back_identical(short_tmp: Path, compression: str) -> None:
    out = short_tmp / "out"
    records = write_captures(short_tmp, f"file://{out}", compression)
    found = list(captured.read(str(out)))
    check_all(found, records)
    assert list(captured.read(f"file://{out}")) == found
    hours = {c.key.split("/")[-2] for c in found}
    assert hours == {"12", "13"}


def test_s3_captures_read_back_identical_plain_and_zstd(
    short_tmp: Path, s3: S3Sandbox, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    records = write_captures(short_tmp / "a", f"s3://{s3.bucket}/plain")
    write_captures(short_tmp / "b", f"s3://{s3.bucket}/zst", "zstd")
    plain = list(captured.read(f"s3://{s3.bucket}/plain"))
    check_all(plain, records)
    zst = list(captured.read(f"s3://{s3.bucket}/zst/"))
    check_all(zst, records)
    assert all(c.key.startswith("zst/") and c.key.endswith(".jsonl.zst") for c in zst)
    # the same selection narrows the listing to hour prefixes when endpoint and variant are given
    window = list(captured.read(f"s3://{s3.bucket}/plain", endpoint="churn", variant="AllTraffic",
                                start="2024-06-01T13:00Z", end="2024-06-01T14:00"))  # fmt: skip
    expect = [
        r["id"] for r in records if r["endpoint"] == "churn" and not r["variant"] and r["when"].hour == 13
    ]
    assert sorted(c.inference_id or "" for c in window) == sorted(expect) and expect
    # --stats over S3: the record path, the block path, and the block path over two worker
    # processes (each downloading its own run of objects) give one report.
    for prefix in ("plain", "zst"):
        source = open_source(f"s3://{s3.bucket}/{prefix}")
        listing = source.listing(Selection())
        by_record = Stats(Selection())
        by_record.listing(listing)
        for c in captures(source, listing, Selection(), by_record.on_problem):
            by_record.add(c)
        assert by_record.report().records == len(records)
        for workers in (1, 2):
            by_block = Stats(Selection())
            by_block.listing(listing)
            assert batch.count(source, listing, by_block, workers=workers) == len(records)
            assert by_block.report() == by_record.report(), (prefix, workers)
    # The command, over S3 with two spawned worker processes: they find the endpoint and the
    # credentials, and the report counts every record.
    done = subprocess.run(
        [sys.executable, "-m", "captured", "read", f"s3://{s3.bucket}/zst", "--stats", "--workers", "2",
         "--endpoint-url", s3.endpoint_url, "--region", "us-east-1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^records +{len(records)}$", done.stdout, re.MULTILINE), done.stdout


def test_selection_by_time_endpoint_variant_and_inference_id(short_tmp: Path) -> None:
    out = short_tmp / "out"
    records = write_captures(short_tmp, f"file://{out}")

    def ids(**kw: Any) -> list[str]:
        return sorted(c.inference_id or "" for c in captured.read(str(out), **kw))

    def expect(keep: Any) -> list[str]:
        return sorted(r["id"] for r in records if keep(r))

    start, end = T0 + dt.timedelta(minutes=10), T0 + dt.timedelta(minutes=50)
    assert ids(start=start, end=end) == expect(lambda r: start <= r["when"] < end)
    assert ids(start="2024-06-01T14:40+02:00") == expect(lambda r: r["when"] >= T0 + dt.timedelta(minutes=10))
    assert ids(endpoint="fraud") == expect(lambda r: r["endpoint"] == "fraud")
    assert ids(variant="Shadow") == expect(lambda r: r["variant"] == "Shadow")
    assert ids(inference_ids=["id-3", "id-8", "nope"]) == ["id-3", "id-8"]
    assert ids(endpoint="churn", end="2024-06-01T13:00") == expect(
        lambda r: r["endpoint"] == "churn" and r["when"].hour == 12
    )
    assert len(list(captured.read(str(out), limit=7))) == 7
    with pytest.raises(ValueError, match="ISO 8601"):
        ids(start="yesterday")


def test_sagemakers_own_sample_lines_read_back_with_their_documented_values(tmp_path: Path) -> None:
    samples = [line.decode() for line in SAGEMAKER_SAMPLES]
    assert len(samples) == 4
    hour = tmp_path / "churn-endpoint" / "AllTraffic" / "2021" / "05" / "18" / "00"
    hour.mkdir(parents=True)
    (hour / "28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl").write_text("\n".join(samples) + "\n")
    first, second, third, fourth = captured.read(str(tmp_path))
    assert first.input is not None and first.output is not None
    assert (first.input.text(), first.input.encoding) == ("41,0,159.3,66\n", "CSV")
    assert (
        first.output.text() == "0.01216088142246008"
        and first.output.content_type == "text/csv; charset=utf-8"
    )
    assert first.event_id == "a727dc55-cbe1-498c-bcb9-9c12eea02b44" and first.inference_id == "58"
    assert first.inference_time == dt.datetime(2021, 5, 18, 0, 29, 2, tzinfo=dt.UTC)
    assert second.output is not None and second.output.json() == {
        "predictions": [{"score": 0.9899773597717285, "predicted_label": 1}]
    }
    assert second.inference_id is None
    assert (
        third.input is not None
        and third.input.encoding == "JSON"
        and third.input.content_type == "application/jsonlines"
    )
    assert fourth.output is not None and fourth.output.encoding == "BASE64" and not fourth.output.binary
    assert fourth.output.json() == {"median_house_value": [478046.66, 206551.01]}
    assert (first.line, second.line, third.line, fourth.line) == (1, 2, 3, 4)


def test_a_corrupt_line_and_a_truncated_zstd_object_are_reported_and_the_rest_read(tmp_path: Path) -> None:
    samples = [line.decode() for line in SAGEMAKER_SAMPLES]
    hour = tmp_path / "ep" / "AllTraffic" / "2021" / "05" / "18" / "00"
    hour.mkdir(parents=True)
    (hour / "00-00-000-00000000-0000-4000-8000-000000000001.jsonl").write_text(
        samples[0] + '\n{"captureData": broken\n' + samples[1] + "\n"
    )
    data = ("\n".join(samples * 200) + "\n").encode()
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)
    (hour / "00-00-000-00000000-0000-4000-8000-000000000002.jsonl.zst").write_bytes(frame[: len(frame) // 2])
    problems: list[tuple[str, str]] = []
    found = list(
        captured.read(str(tmp_path), on_problem=lambda kind, key, detail: problems.append((kind, key)))
    )
    kinds = [kind for kind, _ in problems]
    assert kinds == ["invalid_line", "unreadable_file"]
    assert problems[0][1].endswith("000000000001.jsonl:2")
    from_zst = [c for c in found if c.key.endswith(".zst")]
    assert [c.line for c in found[:2]] == [1, 3] and len(from_zst) < 800
    assert [c.event_id for c in from_zst] == [
        json.loads(s)["eventMetadata"]["eventId"] for s in samples * 200
    ][: len(from_zst)]


def test_the_command_prints_records_raw_lines_and_refuses_what_it_cannot_read(short_tmp: Path) -> None:
    out = short_tmp / "out"
    records = write_captures(short_tmp, f"file://{out}")
    cmd = [sys.executable, "-m", "captured", "read"]
    env = {**os.environ, "PYTHONWARNINGS": "error"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env=env)

    docs = [json.loads(line) for line in run(str(out), "--endpoint", "churn").stdout.splitlines()]
    churn = {r["id"]: r for r in records if r["endpoint"] == "churn"}
    assert sorted(d["inferenceId"] for d in docs) == sorted(churn)
    csv = next(d for d in docs if d["inferenceId"] == "id-1" or d["input"]["encoding"] == "CSV")
    assert set(csv) >= {"endpoint", "variant", "key", "eventId", "inferenceTime", "input", "output"}
    binary = [
        d
        for d in (json.loads(x) for x in run(str(out), "--endpoint", "fraud").stdout.splitlines())
        if d["input"].get("binary")
    ]
    assert binary and all(d["input"]["encoding"] == "BASE64" for d in binary)
    raw = run(str(out), "--raw", "--inference-id", "id-5").stdout
    stored = [
        line
        for p in sorted(out.rglob("*.jsonl"))
        for line in p.read_text().splitlines()
        if '"inferenceId":"id-5"' in line
    ]
    assert raw == stored[0] + "\n"
    assert len(run(str(out), "--limit", "3").stdout.splitlines()) == 3
    stats = run(str(out), "--stats")
    assert stats.returncode == 0 and "40" in stats.stdout and "json_or_csv_as_base64" in stats.stdout
    # fraud has no CaptureContentTypeHeader: its JSON bodies went BASE64, what Model Monitor rejects
    bad = run(str(out), "--validate")
    assert bad.returncode == 1 and "json_or_csv_as_base64" in bad.stdout and "fraud/" in bad.stdout
    clean = run(str(out), "--validate", "--endpoint", "churn")
    assert clean.returncode == 0, clean.stdout
    missing = run(str(short_tmp / "nope"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    bad_time = run(str(out), "--start", "soon")
    assert bad_time.returncode == 2 and "ISO 8601" in bad_time.stderr


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_the_readme_duckdb_recipe_runs_over_a_local_destination(short_tmp: Path, compression: str) -> None:
    """The README's DuckDB query, as written there, over what the daemon delivered: the same
    records as `captured.reader`, with the layout's endpoint and variant."""
    import duckdb

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- duckdb recipe")[1].split("```sql\n")[1].split("```")[0]
    out = short_tmp / "out"
    records = write_captures(short_tmp, f"file://{out}", compression)
    rows = duckdb.connect().execute(block.replace("DEST", str(out))).fetchall()
    mine = {c.inference_id: c for c in captured.read(str(out))}
    assert len(rows) == len(records) == len(mine)
    for endpoint, variant, inference_id, when, data_in, _ in rows:
        c = mine[inference_id]
        assert (endpoint, variant) == (c.endpoint, c.variant)
        assert when == c.inference_time.replace(tzinfo=None)
        assert c.input is not None
        if c.input.encoding != "BASE64":
            assert data_in.encode() == c.input.data
