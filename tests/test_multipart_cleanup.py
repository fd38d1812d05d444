"""No multipart upload is left open: lost CreateMultipartUpload responses, failed aborts, restarts.

S3 bills the parts of an open multipart upload until someone aborts it. These tests put S3 behind
`S3FaultProxy`, which cuts responses after S3 acted on them, fails aborts and resets connections,
and count the uploads left open in the bucket at the end: none.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from captured.client.sync import CaptureClient
from captured.delivery.s3 import MIB
from captured.delivery.uploader import S3Uploader
from captured.errors import UploadError
from captured.service.settings import S3Config
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.proxy import S3FaultProxy
from captured.testing.s3 import S3Sandbox

KEY = "e/AllTraffic/2026/12/03/10/15-30-123-0b0e0c0d-1111-4222-8333-444455556666.jsonl"


@pytest.fixture
def in_process_env(s3: S3Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in s3.server.aws_env().items():
        monkeypatch.setenv(name, value)
    yield


def s3_config(endpoint_url: str, **kw: Any) -> S3Config:
    return S3Config(
        endpoint_url=endpoint_url,
        region="us-east-1",
        multipart_threshold_bytes=5 * MIB,
        part_size_bytes=5 * MIB,
        request_timeout_s=10,
        **kw,
    )


def open_uploads(s3: S3Sandbox) -> list[tuple[str, str]]:
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in uploads)


def big_file(tmp_path: Path, size: int = 6 * MIB) -> Path:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * (size - 1) + b"\n")
    return path


def test_a_lost_create_multipart_upload_response_leaves_no_upload_open(
    s3: S3Sandbox, s3_fault_proxy: S3FaultProxy, tmp_path: Path, in_process_env: None
) -> None:
    """S3 makes the upload, its answer is cut on the way back, botocore asks again and gets a
    second upload: the first, which nobody was told of, is aborted once the second completes."""
    s3_fault_proxy.rule = lambda op, n: "cut" if op == "CreateMultipartUpload" and n == 1 else "pass"
    path = big_file(tmp_path)

    async def main() -> None:
        up = S3Uploader(f"s3://{s3.bucket}/pre", s3_config(s3_fault_proxy.endpoint_url))
        await up.start()
        try:
            await up.put(str(path), KEY)
        finally:
            await up.close()

    asyncio.run(main())
    assert s3_fault_proxy.done("CreateMultipartUpload", "cut") == 1
    assert s3_fault_proxy.done("CreateMultipartUpload", "pass") == 1
    assert s3_fault_proxy.done("AbortMultipartUpload", "pass") == 1
    assert open_uploads(s3) == []
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"pre/{KEY}")["Body"].read()
    assert body == path.read_bytes()


def test_an_abort_that_fails_is_tried_again_until_s3_answers(
    s3: S3Sandbox, s3_fault_proxy: S3FaultProxy, tmp_path: Path, in_process_env: None
) -> None:
    """An outage hits while parts upload: the parts fail, and so does the abort. The abort is
    tried again in the background, and the upload is gone once S3 answers again."""
    outage = threading.Event()
    outage.set()

    def rule(op: str, n: int) -> str:
        if op == "CreateMultipartUpload" or not outage.is_set():
            return "pass"
        return "reset" if op == "UploadPart" else "fail"

    s3_fault_proxy.rule = rule
    path = big_file(tmp_path, 11 * MIB)

    async def main() -> tuple[int, list[tuple[str, str]], int]:
        from captured.delivery.s3 import S3Destination

        dest = S3Destination(f"s3://{s3.bucket}/pre", s3_config(s3_fault_proxy.endpoint_url))
        await dest.start()
        try:
            with pytest.raises(UploadError) as info:
                await dest.put(str(path), KEY)
            assert info.value.retryable
            left_during = len(dest.unaborted)
            during = await asyncio.to_thread(open_uploads, s3)
            outage.clear()
            async with asyncio.timeout(20):
                while dest.unaborted:
                    await asyncio.sleep(0.05)
            return left_during, during, s3_fault_proxy.done("AbortMultipartUpload", "fail")
        finally:
            await dest.close()

    left_during, during, failed_aborts = asyncio.run(main())
    assert left_during == 1 and len(during) == 1 and during[0][0] == f"pre/{KEY}"
    assert failed_aborts >= 1
    assert s3_fault_proxy.done("AbortMultipartUpload", "pass") == 1
    assert open_uploads(s3) == []


def test_a_retry_aborts_every_open_upload_of_its_key_first_and_no_other(
    s3: S3Sandbox, tmp_path: Path, in_process_env: None
) -> None:
    """Uploads an earlier attempt left open for the key (two of them) are aborted before the
    retry uploads; another file's open upload is not touched. If they cannot be listed, the
    retry fails (retryable) rather than upload past them."""
    other = KEY.replace("0b0e0c0d", "99999999")
    for key in (KEY, KEY, other):
        s3.client.create_multipart_upload(Bucket=s3.bucket, Key=f"pre/{key}")
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"a\n")

    async def main() -> None:
        up = S3Uploader(f"s3://{s3.bucket}/pre", s3_config(s3.server.endpoint_url))
        await up.start()
        try:
            await up.put(str(small), KEY, retry=True)
        finally:
            await up.close()

    asyncio.run(main())
    assert [k for k, _ in open_uploads(s3)] == [f"pre/{other}"]
    assert s3.client.get_object(Bucket=s3.bucket, Key=f"pre/{KEY}")["Body"].read() == b"a\n"


def test_a_retry_that_cannot_list_the_keys_uploads_fails_and_uploads_nothing(
    s3: S3Sandbox, s3_fault_proxy: S3FaultProxy, tmp_path: Path, in_process_env: None
) -> None:
    s3_fault_proxy.rule = lambda op, n: "fail" if op == "ListMultipartUploads" else "pass"
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"a\n")

    async def main() -> UploadError:
        up = S3Uploader(f"s3://{s3.bucket}/pre", s3_config(s3_fault_proxy.endpoint_url))
        await up.start()
        try:
            with pytest.raises(UploadError) as info:
                await up.put(str(small), KEY, retry=True)
            return info.value
        finally:
            await up.close()

    err = asyncio.run(main())
    assert err.retryable and err.cause == "throttled"
    assert s3_fault_proxy.done("PutObject", "pass") == 0
    assert s3.client.list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0


def test_start_up_clean_up_lists_only_old_capture_file_uploads_under_its_own_prefix(
    s3: S3Sandbox, s3_fault_proxy: S3FaultProxy, in_process_env: None
) -> None:
    """Under the daemon's own `{endpoint}/` prefix, a capture-file upload is listed as stale only
    when older than the configured age (a younger one may be another host's, in flight). Other
    endpoints' uploads, keys that are not capture files, and `e-2/` (which `e/` must not match
    as a string prefix) are never listed; what is listed is aborted."""
    planted = {
        "mine": KEY,
        "not_a_capture_file": "e/notes.txt",
        "other_endpoint": "f" + KEY[1:],
        "longer_endpoint": "e-2" + KEY[1:],
    }
    via_proxy = s3.server.boto3_client(endpoint_url=s3_fault_proxy.endpoint_url)  # S3's Initiated times
    for key in planted.values():
        via_proxy.create_multipart_upload(Bucket=s3.bucket, Key=f"pre/{key}")

    async def clean(older_than_s: float) -> tuple[list[tuple[str, str]], int]:
        up = S3Uploader(f"s3://{s3.bucket}/pre", s3_config(s3_fault_proxy.endpoint_url))
        await up.start()
        try:
            stale = await up.list_stale("e/", older_than_s)
            return stale, await up.abort_uploads(stale)
        finally:
            await up.close()

    assert asyncio.run(clean(3600)) == ([], 0)
    time.sleep(1.1)  # S3 reports Initiated to the second
    stale, aborted = asyncio.run(clean(1))
    assert [key for key, _ in stale] == [KEY] and aborted == 1
    left = {k for k, _ in open_uploads(s3)}
    assert left == {f"pre/{planted[n]}" for n in ("not_a_capture_file", "other_endpoint", "longer_endpoint")}


# -- the daemon, end to end ------------------------------------------------------------------


def fault_daemon(daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], endpoint_url: str) -> Any:
    d = daemon_factory(
        extra_toml=(
            "[spool]\nmax_file_age_s = 0.5\n"
            f'[s3]\nendpoint_url = "{endpoint_url}"\nregion = "us-east-1"\n'
            "multipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\nmax_concurrent_parts = 2\n"
            "request_timeout_s = 5\nshutdown_timeout_s = 5\nabort_unknown_uploads_after_s = 0\n"
        ),
        env=aws_env,
    )
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "s3://{s3.bucket}/captures"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return d


BODY = b"1," * 150_000 + b"\n"  # 300 kB: 20 records make a 6 MiB file, a multipart upload


def send(d: DaemonProcess, ids: range) -> None:
    with CaptureClient(d.socket_path, buffer_bytes=64 * MIB) as client:
        for i in ids:
            assert client.capture(BODY, None, request_content_type="text/csv", inference_id=str(i))
        assert client.flush(timeout=60)


def delivered(s3: S3Sandbox) -> list[int]:
    ids = []
    for obj in s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", []):
        body = s3.client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
        ids += [int(json.loads(line)["eventMetadata"]["inferenceId"]) for line in body.splitlines()]
    return sorted(ids)


def test_s3_faults_and_a_restart_leave_no_multipart_upload_open_and_every_record_once(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_fault_proxy: S3FaultProxy
) -> None:
    """Through the daemon and its uploader process, with S3 behind the fault proxy:

    1. every other CreateMultipartUpload response is cut after S3 made the upload;
    2. an outage while uploads are in flight: parts are reset, aborts and listings fail;
    3. the whole service is killed (SIGKILL) during the outage, with uploads open that it could
       not abort, and an upload is planted that no spool file explains (a spool lost with its
       disk); the service starts again and S3 comes back.
    Every record reaches the bucket exactly once and no multipart upload is left open."""
    outage = threading.Event()

    def rule(op: str, n: int) -> str:
        if op == "CreateMultipartUpload":
            return "cut" if n % 2 else "pass"
        if outage.is_set():
            return "reset" if op == "UploadPart" else "fail"
        return "pass"

    s3_fault_proxy.rule = rule
    d = fault_daemon(daemon_factory, s3, aws_env, s3_fault_proxy.endpoint_url).start()
    send(d, range(0, 20))
    wait_for(lambda: d.status()["delivery"]["files_delivered"] == 1, timeout=60)
    assert s3_fault_proxy.done("CreateMultipartUpload", "cut") >= 1
    assert open_uploads(s3) == []  # the cut create's upload was aborted once the file was in

    outage.set()
    send(d, range(20, 60))
    wait_for(
        lambda: s3_fault_proxy.done("AbortMultipartUpload", "fail") >= 2 and open_uploads(s3), timeout=60
    )
    service = [psutil.Process(d.proc.pid), *psutil.Process(d.proc.pid).children()]  # type: ignore[union-attr]
    for proc in service:
        proc.send_signal(signal.SIGKILL)
    d.stop(signal.SIGKILL)
    left_open = open_uploads(s3)
    assert left_open, "the outage should have left uploads the service could not abort"
    lost = (
        "captures/test-endpoint/AllTraffic/2026/01/01/00/00-00-000-0b0e0c0d-1111-4222-8333-444455556666.jsonl"
    )
    s3.client.create_multipart_upload(Bucket=s3.bucket, Key=lost)

    outage.clear()
    d.start()
    wait_for(
        lambda: d.status()["delivery"]["files_waiting"] == 0 and d.status()["spool"]["open_files"] == 0,
        timeout=90,
    )
    assert d.stop() == 0
    assert open_uploads(s3) == []
    assert delivered(s3) == list(range(60))
    log = d.log()
    assert "aborted 1 multipart upload(s) under test-endpoint/ left open by an earlier run" in log
    assert "left open by an earlier attempt" in log


def test_shutdown_retries_an_abort_that_failed_and_says_what_is_left(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_fault_proxy: S3FaultProxy
) -> None:
    """SIGTERM while S3 refuses every abort: the daemon exits 0, the file stays whole in the
    spool, and the log names the upload it could not abort; the next start aborts it."""
    s3_fault_proxy.rule = lambda op, n: "pass" if op == "CreateMultipartUpload" else "fail"
    d = fault_daemon(daemon_factory, s3, aws_env, s3_fault_proxy.endpoint_url).start()
    send(d, range(0, 20))
    wait_for(lambda: s3_fault_proxy.done("AbortMultipartUpload", "fail") >= 1, timeout=60)
    assert d.stop() == 0
    assert "could not be aborted" in d.log()
    assert open_uploads(s3)
    assert list(d.spool_dir.glob("*.jsonl"))
    s3_fault_proxy.rule = lambda op, n: "pass"
    d.start()
    wait_for(lambda: d.status()["delivery"]["files_waiting"] == 0, timeout=60)
    assert d.stop() == 0
    assert open_uploads(s3) == []
    assert delivered(s3) == list(range(20))
    assert not os.listdir(d.spool_dir) or set(os.listdir(d.spool_dir)) == {".lock", ".journal"}
