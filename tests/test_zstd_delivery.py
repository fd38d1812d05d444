"""`[delivery] compression = "zstd"`: every delivered object a `.jsonl.zst` holding one zstd
frame of exactly the lines the plain file would hold, to `file://` and to S3, each record once;
a kill -9 while compressing loses and duplicates nothing; objects respect `max_file_bytes`.

Real parts: the daemon (in the test's loop, or a subprocess for kill -9), real sockets and
clients, the moto S3 server, the `zstandard` package and DuckDB to read what arrived.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import duckdb
import pytest
import zstandard

from captured.client.aio import AsyncCaptureClient
from captured.client.sync import CaptureClient
from captured.delivery.compress import check_file
from captured.service.config import Config, load_config
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.inprocess import FakeClock, eventually, run_daemon
from captured.testing.s3 import S3Sandbox

BODY = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9," * 8  # ~300 bytes of CSV, compressible as real ones are


def config(root: Path, destination: str, extra: str = "", kms: str | None = None) -> Config:
    path = root / "captured.toml"
    path.write_text(
        'endpoint_name = "zep"\n'
        f'socket_path = "{root / "c.sock"}"\n'
        f'spool_dir = "{root / "spool"}"\n'
        '[delivery]\ncompression = "zstd"\n'
        + extra
        + "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "{destination}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        + (f'KmsKeyId = "{kms}"\n' if kms else "")
        + '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return load_config(str(path))


def one_frame(data: bytes) -> bytes:
    """The content of `data` if it is exactly one whole zstd frame (with its content size)."""
    params = zstandard.get_frame_parameters(data)
    obj = zstandard.ZstdDecompressor().decompressobj()
    plain = obj.decompress(data)
    assert obj.eof and not obj.unused_data, "not exactly one whole frame"
    assert params.content_size == len(plain)
    return plain


def lines_of(plain: bytes) -> list[dict[str, Any]]:
    assert plain.endswith(b"\n")
    return [json.loads(line) for line in plain.splitlines()]


async def send(socket_path: str, start: int, n: int) -> None:
    """`n` records, flushed every 5,000 (the client's buffer holds 8 MiB)."""
    async with AsyncCaptureClient(socket_path) as client:
        for i in range(start, start + n):
            assert client.capture(f"{i},{BODY}", "0.5", request_content_type="text/csv",
                                  response_content_type="text/csv", inference_id=str(i))  # fmt: skip
            if i % 5000 == 4999:
                assert await client.flush(timeout=30)
        assert await client.flush(timeout=30)


def test_zstd_to_a_local_directory_every_record_once_and_duckdb_reads_it(short_tmp: Path) -> None:
    out = short_tmp / "out"
    cfg = config(short_tmp, f"file://{out}", "[spool]\nmax_file_bytes = 65536\n")

    async def main() -> Any:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, 0, 3000)
            st = daemon.status()
        return st

    asyncio.run(main())
    objects = sorted(out.rglob("*"))
    files = [p for p in objects if p.is_file()]
    assert files and all(p.name.endswith(".jsonl.zst") for p in files)
    assert all(str(p.relative_to(out)).startswith("zep/AllTraffic/") for p in files)
    ids: list[int] = []
    for p in files:
        plain = one_frame(p.read_bytes())
        assert check_file(str(p)) == len(plain)
        ids += [int(r["eventMetadata"]["inferenceId"]) for r in lines_of(plain)]
        assert all(len(r["captureData"]) == 2 for r in lines_of(plain))
    assert sorted(ids) == list(range(3000))
    rows = duckdb.connect().execute(f"select count(*), count(distinct eventMetadata.inferenceId) from read_json('{out}/**/*.jsonl.zst', format='newline_delimited')").fetchone()  # fmt: skip
    assert rows == (3000, 3000)
    assert sorted(p.name for p in (short_tmp / "spool").iterdir()) == [".journal", ".lock"]


def test_zstd_to_s3_with_kms_every_object_one_frame_every_record_once(
    short_tmp: Path, s3: S3Sandbox, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in aws_env.items():
        monkeypatch.setenv(key, value)
    cfg = config(short_tmp, f"s3://{s3.bucket}/zcap", "[spool]\nmax_file_bytes = 65536\n", kms="alias/z")

    async def main() -> Any:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, 0, 2000)
            await eventually(lambda: daemon.status().delivery.files_delivered >= 1, timeout=30)
            return daemon

    daemon = asyncio.run(main())
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="zcap/")["Contents"]
    ids: list[int] = []
    for obj in listed:
        assert obj["Key"].startswith("zcap/zep/AllTraffic/") and obj["Key"].endswith(".jsonl.zst")
        head = s3.client.head_object(Bucket=s3.bucket, Key=obj["Key"])
        assert head["SSEKMSKeyId"] == "alias/z"
        data = s3.client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
        ids += [int(r["eventMetadata"]["inferenceId"]) for r in lines_of(one_frame(data))]
    assert sorted(ids) == list(range(2000))
    z = daemon.status().compression
    assert z is not None and z.files == len(listed) and z.compressed_bytes == sum(o["Size"] for o in listed)
    assert z.plain_bytes > 3 * z.compressed_bytes


def test_compressed_objects_stay_within_max_file_bytes_and_are_not_sealed_small(short_tmp: Path) -> None:
    """max_file_bytes = 128 KiB. The first files are sealed at 128 KiB plain (nothing learned
    yet); once some are compressed, the spool lets plain files grow by the learned ratio (x0.8
    margin), so later objects come near 128 KiB compressed instead of a tenth of it, and none
    exceeds it."""
    limit = 128 * 1024
    out = short_tmp / "out"
    cfg = config(short_tmp, f"file://{out}", f"[spool]\nmax_file_bytes = {limit}\n")

    async def main() -> int:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, 0, 2000)  # ~0.8 MB: a few files at the plain limit
            await eventually(lambda: daemon.status().compression.files >= 3, timeout=30)  # type: ignore[union-attr]
            grown = daemon.spool.max_bytes
            await send(cfg.socket_path, 2000, 30_000)  # ~12 MB plain
            return grown

    grown = asyncio.run(main())
    assert grown > 3 * limit  # the spool learned the ratio
    sizes = [p.stat().st_size for p in out.rglob("*.jsonl.zst")]
    assert max(sizes) <= limit
    assert max(sizes) > limit // 2  # objects stay large: not sealed at a tenth of the size asked
    ids = [
        int(r["eventMetadata"]["inferenceId"])
        for p in out.rglob("*.jsonl.zst")
        for r in lines_of(one_frame(p.read_bytes()))
    ]
    assert sorted(ids) == list(range(32_000))


def test_kill_9_while_compressing_recovers_without_loss_or_duplicates(daemon_factory: Any) -> None:
    """A slow compression (level 19, a ~14 MB file) is under way when the daemon is killed: the
    half-written `.jsonl.zst` stays in the spool beside its plain file. The next start removes
    it, compresses again from the plain file and delivers: every acknowledged record once."""
    d: DaemonProcess = daemon_factory(
        extra_toml='[delivery]\ncompression = "zstd"\ncompression_level = 19\n[spool]\nmax_file_age_s = 1\n'
    )
    d.start()
    n = 40_000
    with CaptureClient(d.socket_path) as client:
        for i in range(n):
            client.capture(f"{i},{BODY}", "0.5", request_content_type="text/csv", response_content_type="text/csv",
                           inference_id=str(i))  # fmt: skip
            if i % 5000 == 4999:
                assert client.flush(timeout=30)  # the buffer is 8 MiB: send in steps
        assert client.flush(timeout=30)
    leftover = wait_for(lambda: list(d.spool_dir.glob("*.jsonl.zst")), timeout=60, interval=0.005)
    d.stop(signal.SIGKILL)
    assert leftover[0].exists() and Path(str(leftover[0])[: -len(".zst")]).exists()
    with pytest.raises(zstandard.ZstdError):
        check_file(str(leftover[0]))  # torn: the frame was never finished
    d.extra_toml = d.extra_toml.replace("compression_level = 19", "compression_level = 1")  # quick now
    d.write_config()
    d.start()
    assert wait_for(lambda: "removed 1 compressed file(s)" in d.log(), timeout=10)
    d.stop()
    ids: list[int] = []
    for p in d.out_dir.rglob("*.jsonl.zst"):
        ids += [int(r["eventMetadata"]["inferenceId"]) for r in lines_of(one_frame(p.read_bytes()))]
    assert sorted(ids) == list(range(n))
    assert not list(d.out_dir.rglob("*.jsonl"))
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}
