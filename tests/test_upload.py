"""The uploader's pieces: part planning, keys, error classes, streamed bodies, the child process."""

from __future__ import annotations

import asyncio
import base64
import os
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from captured.delivery.s3 import MAX_PARTS, MIB, classify, plan_parts, s3_key, split_s3_uri
from captured.delivery.s3body import FilePart, crc32_of
from captured.delivery.uploader import S3Uploader
from captured.errors import UploadError
from captured.service.settings import S3Config
from captured.testing.s3 import MotoServer, S3Sandbox

GIB = 1024 * MIB


@pytest.mark.parametrize(
    ("size", "part_size", "parts", "first"),
    [
        (16 * MIB, 8 * MIB, 2, 8 * MIB),
        (16 * MIB + 1, 8 * MIB, 3, 8 * MIB),
        (6 * MIB, 1 * MIB, 2, 5 * MIB),  # below S3's 5 MiB minimum: raised
        (100 * GIB, 8 * MIB, 9_310, 11 * MIB),  # would need > 10,000 parts: raised to whole MiB
        (1, 8 * MIB, 1, 1),
    ],
)
def test_plan_parts_follows_s3_rules(size: int, part_size: int, parts: int, first: int) -> None:
    plan = plan_parts(size, part_size)
    assert len(plan) == parts <= MAX_PARTS
    assert plan[0][1] == first
    assert sum(length for _, length in plan) == size
    assert all(off == i * first for i, (off, _) in enumerate(plan))
    assert all(length == first for _, length in plan[:-1])
    assert 0 < plan[-1][1] <= first


def test_plan_parts_refuses_what_s3_cannot_hold() -> None:
    with pytest.raises(ValueError):
        plan_parts(0, 8 * MIB)
    with pytest.raises(ValueError):
        plan_parts(10_000 * 5 * GIB + 1, 8 * MIB)


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix", "key"),
    [
        ("s3://b/captures/", "b", "captures", "captures/e/v/2026/01/02/03/k.jsonl"),
        ("s3://b/a/b", "b", "a/b", "a/b/e/v/2026/01/02/03/k.jsonl"),
        ("s3://b", "b", "", "e/v/2026/01/02/03/k.jsonl"),
        ("s3://b/", "b", "", "e/v/2026/01/02/03/k.jsonl"),
    ],
)
def test_keys_never_start_with_or_double_a_slash(uri: str, bucket: str, prefix: str, key: str) -> None:
    assert split_s3_uri(uri) == (bucket, prefix)
    assert s3_key(prefix, "e/v/2026/01/02/03/k.jsonl") == key


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("exc", "cause", "retryable"),
    [
        (client_error("AccessDenied", 403), "access_denied", False),
        (client_error("NoSuchBucket", 404), "no_such_bucket", False),
        (client_error("InvalidAccessKeyId", 403), "bad_credentials", False),
        (client_error("KMS.NotFoundException", 400), "kms_key", False),
        (client_error("SlowDown", 503), "throttled", True),
        (client_error("InternalError", 500), "server_error", True),
        (client_error("", 502), "server_error", True),
        (client_error("403", 403), "access_denied", False),  # a denial with no body
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "connection", True),
        (TimeoutError(), "timeout", True),
        (ConnectionResetError(), "connection", True),
    ],
)
def test_classify(exc: BaseException, cause: str, retryable: bool) -> None:
    err = classify(exc)
    assert type(err) is UploadError and (err.cause, err.retryable) == (cause, retryable)
    assert classify(err) is err  # already classified: passed through


def test_crc32_of_a_file_region_is_s3s_base64_form(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    for offset, length in [(0, len(data)), (5, MIB * 2 + 3), (len(data) - 1, 1)]:
        expected = base64.b64encode(zlib.crc32(data[offset : offset + length]).to_bytes(4, "big")).decode()
        assert crc32_of(str(path), offset, length) == expected
    with pytest.raises(UploadError) as info:
        crc32_of(str(path), len(data) - 10, 20)
    assert (info.value.cause, info.value.retryable) == ("local_file", False)


class CollectingWriter:
    """What aiohttp's StreamWriter offers a payload: `write` (awaited, one chunk at a time)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk: bytes) -> None:
        self.chunks.append(bytes(chunk))


def test_file_part_streams_its_region_in_bounded_pieces_and_is_file_like(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 100)
    path = tmp_path / "f"
    path.write_bytes(data)
    part = FilePart(str(path), 50, 2 * MIB)
    assert len(part) == part.size == 2 * MIB
    for _ in range(2):  # a retry sends the same bytes again
        writer = CollectingWriter()
        asyncio.run(part.write(writer))  # type: ignore[arg-type]
        assert b"".join(writer.chunks) == data[50 : 50 + 2 * MIB]
        assert max(len(c) for c in writer.chunks) <= MIB
    assert part.read(10) == data[50:60] and part.tell() == 10
    assert part.seek(0) == 0 and part.read() == data[50 : 50 + 2 * MIB]
    path.write_bytes(data[:100])  # the file shrank under the part
    with pytest.raises(UploadError):
        asyncio.run(part.write(CollectingWriter()))  # type: ignore[arg-type]


def uploader_for(moto: MotoServer, bucket: str, **s3: Any) -> S3Uploader:
    cfg = S3Config(endpoint_url=s3.pop("endpoint_url", moto.endpoint_url), region="us-east-1", **s3)
    return S3Uploader(f"s3://{bucket}/pre/", cfg)


def test_uploader_process_puts_objects_and_replaces_a_dead_child(
    s3: S3Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the child process: a small file (PutObject) and a 12 MiB one (multipart in 5 MiB
    parts) arrive byte for byte; after the child is killed, the next upload starts a new one."""
    for name, value in s3.server.aws_env().items():
        monkeypatch.setenv(name, value)
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"a,b\n" * 1000)
    big.write_bytes(os.urandom(12 * MIB))

    async def main() -> tuple[int, int]:
        up = uploader_for(s3.server, s3.bucket, multipart_threshold_bytes=5 * MIB, part_size_bytes=5 * MIB)
        await up.start()
        try:
            await up.put(str(small), "e/v/small.jsonl")
            await up.put(str(big), "e/v/big.jsonl")
            first = up.pid
            assert first is not None
            psutil.Process(first).kill()
            await asyncio.sleep(0.2)
            await up.put(str(small), "e/v/again.jsonl")
            assert up.pid not in (None, first)
            return first, up.starts
        finally:
            await up.close()

    _, starts = asyncio.run(main())
    assert starts == 2
    get = s3.client.get_object
    assert get(Bucket=s3.bucket, Key="pre/e/v/small.jsonl")["Body"].read() == small.read_bytes()
    assert get(Bucket=s3.bucket, Key="pre/e/v/big.jsonl")["Body"].read() == big.read_bytes()
    assert get(Bucket=s3.bucket, Key="pre/e/v/big.jsonl")["ETag"].strip('"').endswith("-3")
    assert get(Bucket=s3.bucket, Key="pre/e/v/again.jsonl")["Body"].read() == small.read_bytes()


def test_uploader_process_reports_failures_with_their_cause(
    s3: S3Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.server.aws_env().items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "f"
    path.write_bytes(b"x\n")

    async def main() -> list[tuple[str, bool]]:
        causes = []
        for up in (
            uploader_for(s3.server, "no-such-bucket-anywhere"),
            uploader_for(s3.server, s3.bucket, endpoint_url="http://127.0.0.1:9", request_timeout_s=5),
        ):
            await up.start()
            try:
                with pytest.raises(UploadError) as info:
                    await up.put(str(path), "k.jsonl")
                causes.append((info.value.cause, info.value.retryable))
            finally:
                await up.close()
        return causes

    assert asyncio.run(main()) == [("no_such_bucket", False), ("connection", True)]
