"""Delivery to S3: the real daemon uploads to a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import time
from typing import Any

import psutil

from captured import CaptureClient
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.proxy import S3FaultProxy
from captured.testing.s3 import S3Sandbox

KEY = re.compile(
    r"captures/test-endpoint/AllTraffic/(\d{4})/(\d\d)/(\d\d)/(\d\d)/\d\d-\d\d-\d{3}-[0-9a-f-]{36}\.jsonl"
)


def s3_daemon(
    daemon_factory: Any,
    s3: S3Sandbox,
    aws_env: dict[str, str],
    kms: str | None = None,
    endpoint_url: str | None = None,
    bucket: str | None = None,
    extra_s3: str = "",
    seal_after_s: float = 0.5,
) -> DaemonProcess:
    d: DaemonProcess = daemon_factory(
        extra_toml=(
            f"[spool]\nmax_file_age_s = {seal_after_s}\n"
            f'[s3]\nendpoint_url = "{endpoint_url or s3.endpoint_url}"\nregion = "us-east-1"\n'
            "shutdown_timeout_s = 3\n" + extra_s3
        ),
        env=aws_env,
    )
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "s3://{bucket or s3.bucket}/captures/"\n'  # a trailing "/" must not give "//"
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        + (f'KmsKeyId = "{kms}"\n' if kms else "")
        + '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return d.start()


def objects(s3: S3Sandbox) -> dict[str, bytes]:
    listed = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    return {o["Key"]: s3.client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_records_reach_s3_under_sagemaker_keys_exactly_once(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    """Records of two hours are captured, the daemon stops (seal + deliver), and each record is in
    exactly one object under prefix/endpoint/variant/yyyy/mm/dd/hh/; the spool is empty."""
    d = s3_daemon(daemon_factory, s3, aws_env, kms="alias/captures")
    base = dt.datetime(2026, 3, 1, 10, 59, 58, tzinfo=dt.UTC).timestamp()
    with CaptureClient(d.socket_path) as client:
        for i in range(400):
            client.capture(
                f"{i},1\n",
                "0",
                request_content_type="text/csv",
                response_content_type="text/csv",
                inference_id=str(i),
                inference_time=base + i * 0.01,
            )
        assert client.flush(timeout=10)
    assert d.stop() == 0, d.log()
    found = objects(s3)
    assert found, d.log()
    hours = set()
    ids: list[int] = []
    for key, body in found.items():
        m = KEY.fullmatch(key)
        assert m, key
        hours.add(m.group(4))
        ids += [int(json.loads(line)["eventMetadata"]["inferenceId"]) for line in body.splitlines()]
        head = s3.client.head_object(Bucket=s3.bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == "alias/captures"
    assert hours == {"10", "11"}
    assert sorted(ids) == list(range(400))
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def multipart_daemon(
    daemon_factory: Any,
    s3: S3Sandbox,
    aws_env: dict[str, str],
    endpoint_url: str,
    *,
    parts: int,
    seal_after_s: float = 60.0,
) -> DaemonProcess:
    """A running daemon capturing Input only, with 5 MiB multipart threshold and parts."""
    d: DaemonProcess = daemon_factory(
        extra_toml=(
            f"[spool]\nmax_file_age_s = {seal_after_s}\n"
            f'[s3]\nendpoint_url = "{endpoint_url}"\nregion = "us-east-1"\n'
            f"multipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\nmax_concurrent_parts = {parts}\n"
        ),
        env=aws_env,
    )
    d.write_config(
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "s3://{s3.bucket}/captures"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return d.start()


def test_a_large_file_goes_up_as_multipart_with_parallel_parts_and_a_small_one_with_put_object(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_fault_proxy: S3FaultProxy
) -> None:
    """A ~17 MB file goes up in four 5 MiB parts (ETag `-4`) and a tiny one with PutObject.

    The parts are seen to travel in parallel: the proxy in front of S3 holds each UploadPart for
    a second before it forwards it, and sees all four in flight at once. Sent one after another,
    they would never overlap. (Counting open TCP connections instead, as this test once did,
    depends on timing: on a loaded machine a part can finish before the next one starts, and
    its pooled connection is reused.)
    """
    s3_fault_proxy.slow_s = 1.0
    s3_fault_proxy.rule = lambda op, n: "slow" if op == "UploadPart" else "pass"
    d = multipart_daemon(daemon_factory, s3, aws_env, s3_fault_proxy.endpoint_url, parts=4)
    body = b"1," * 300_000 + b"\n"  # 600 KB per record
    big_hour = dt.datetime(2026, 3, 1, 10, 0, 1, tzinfo=dt.UTC).timestamp()
    small_hour = dt.datetime(2026, 3, 1, 12, 0, 1, tzinfo=dt.UTC).timestamp()
    with CaptureClient(d.socket_path, buffer_bytes=64 * 1024 * 1024) as client:
        for _ in range(28):  # ~16.8 MB in hour 10: four 5 MiB parts
            assert client.capture(body, None, request_content_type="text/csv", inference_time=big_hour)
        client.capture(b"1,2\n", None, request_content_type="text/csv", inference_time=small_hour)
        assert client.flush(timeout=30)
    assert d.stop() == 0, d.log()
    etags = {}
    for key in objects(s3):
        etags[KEY.fullmatch(key).group(4)] = s3.client.head_object(Bucket=s3.bucket, Key=key)["ETag"]  # type: ignore[union-attr]
    assert etags["10"].strip('"').endswith("-4")
    assert "-" not in etags["12"]
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    assert s3_fault_proxy.done("UploadPart", "slow") == 4
    assert s3_fault_proxy.peak_in_flight["UploadPart"] == 4, s3_fault_proxy.peak_in_flight


def capture_n(d: DaemonProcess, n: int, start: int = 0) -> None:
    with CaptureClient(d.socket_path) as client:
        for i in range(start, start + n):
            client.capture(
                f"{i},1\n",
                "0",
                request_content_type="text/csv",
                response_content_type="text/csv",
                inference_id=str(i),
            )
        assert client.flush(timeout=10)


def delivered_ids(s3: S3Sandbox) -> list[int]:
    return sorted(
        int(json.loads(line)["eventMetadata"]["inferenceId"])
        for body in objects(s3).values()
        for line in body.splitlines()
    )


def test_an_s3_outage_loses_and_duplicates_nothing(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_proxy: Any
) -> None:
    """S3 refuses connections while records are captured and files sealed: the files wait in the
    spool, failures are counted as retryable; when S3 is back, delivery resumes by itself and
    every record is in S3 exactly once."""
    s3_proxy.set_mode("refuse")
    d = s3_daemon(daemon_factory, s3, aws_env, endpoint_url=s3_proxy.endpoint_url)
    capture_n(d, 100)
    wait_for(lambda: d.status()["delivery"]["failures"].get("connection", 0) >= 2, timeout=30)
    capture_n(d, 100, start=100)
    assert d.status()["delivery"]["files_waiting"] >= 1
    assert objects(s3) == {}
    s3_proxy.set_mode("pass")
    wait_for(
        lambda: d.status()["delivery"]["files_waiting"] == 0 and d.status()["spool"]["open_files"] == 0,
        timeout=60,
    )
    assert delivered_ids(s3) == list(range(200))
    assert d.stop() == 0
    assert delivered_ids(s3) == list(range(200))
    assert "delivery of" in d.log() and "(connection), retrying" in d.log()


def test_a_missing_bucket_is_a_counted_fatal_failure_and_the_files_stay(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    d = s3_daemon(daemon_factory, s3, aws_env, bucket="no-such-bucket-here")
    capture_n(d, 10)
    wait_for(lambda: d.status()["delivery"]["failures"].get("no_such_bucket", 0) >= 1, timeout=30)
    assert d.status()["delivery"]["files_waiting"] == 1
    log = d.log()
    assert log.count("(no_such_bucket)") == 1 and "until the cause is fixed" in log
    assert d.stop() == 0  # shutdown gives up after s3.shutdown_timeout_s; the file is kept
    assert len(list(d.spool_dir.glob("*.jsonl"))) == 1


def test_sigkill_during_a_multipart_upload_leaves_no_orphan_and_no_duplicate(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_proxy: Any
) -> None:
    """The daemon is killed with SIGKILL while a multipart upload is open (its parts frozen by the
    proxy); the next start aborts that upload, uploads the file again under the same key, and
    the bucket ends with exactly the captured records and no open multipart upload."""
    d = multipart_daemon(daemon_factory, s3, aws_env, s3_proxy.endpoint_url, parts=1, seal_after_s=0.5)
    body = b"1," * 300_000 + b"\n"
    with CaptureClient(d.socket_path, buffer_bytes=64 * 1024 * 1024) as client:
        for i in range(20):
            assert client.capture(body, None, request_content_type="text/csv", inference_id=str(i))
        assert client.flush(timeout=30)

    def open_uploads() -> list[Any]:
        return s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])

    wait_for(open_uploads, timeout=30, interval=0.005)
    s3_proxy.set_mode("stall")
    # The whole service dies at once (as systemd's final SIGKILL to the control group, or the
    # OOM killer): the daemon and its uploader process, so nobody aborts the open upload.
    uploader = psutil.Process(d.proc.pid).children()  # type: ignore[union-attr]
    assert len(uploader) == 1
    uploader[0].kill()
    d.stop(signal.SIGKILL)
    assert len(open_uploads()) == 1
    assert objects(s3) == {}
    s3_proxy.set_mode("pass")
    d.start()
    wait_for(lambda: d.status()["delivery"]["files_waiting"] == 0 and objects(s3), timeout=60)
    assert d.stop() == 0
    assert open_uploads() == []
    (body_bytes,) = objects(s3).values()
    ids = [json.loads(line)["eventMetadata"]["inferenceId"] for line in body_bytes.splitlines()]
    assert sorted(ids, key=int) == [str(i) for i in range(20)]
    assert "aborted 1 multipart upload(s) of captures/" in d.log()
    assert "left open by an earlier attempt" in d.log()


def test_access_denied_is_logged_once_counted_and_resumes_once_fixed(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    """With IAM enforced, the daemon's credentials are refused (403): one log line naming the
    cause, failures counted as a fatal cause, the sealed file kept in the spool; once IAM lets
    the credentials through, the file is delivered at the slow retry pace, without a restart."""
    d = s3_daemon(daemon_factory, s3, aws_env, extra_s3="fatal_retry_s = 1\n")
    with s3.server.iam_auth():
        capture_n(d, 10)
        wait_for(lambda: d.status()["delivery"]["failures"].get("bad_credentials", 0) >= 2, timeout=30)
        assert d.status()["delivery"]["files_waiting"] == 1  # (the test's own client is refused too)
    log = d.log()
    assert log.count("(bad_credentials)") == 1 and "InvalidAccessKeyId" in log
    # The permission is fixed (IAM no longer enforced): delivery resumes without a restart.
    wait_for(lambda: d.status()["delivery"]["files_waiting"] == 0, timeout=30)
    assert delivered_ids(s3) == list(range(10))
    assert d.stop() == 0


def test_a_stalled_s3_endpoint_times_out_and_delivery_resumes(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_proxy: Any
) -> None:
    """The endpoint accepts connections but never answers: each request times out (a retryable
    cause), the files wait; once it answers again every record arrives exactly once."""
    s3_proxy.set_mode("stall")
    d = s3_daemon(
        daemon_factory, s3, aws_env, endpoint_url=s3_proxy.endpoint_url, extra_s3="request_timeout_s = 1\n"
    )
    capture_n(d, 50)
    wait_for(lambda: d.status()["delivery"]["failures"].get("timeout", 0) >= 1, timeout=30)
    assert d.status()["delivery"]["files_waiting"] >= 1
    s3_proxy.set_mode("pass")
    wait_for(
        lambda: d.status()["delivery"]["files_waiting"] == 0 and d.status()["spool"]["open_files"] == 0,
        timeout=60,
    )
    assert d.stop() == 0
    assert delivered_ids(s3) == list(range(50))


def test_sigterm_seals_open_files_and_uploads_them_before_exit(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    """Files still open at SIGTERM (rotation is an hour away) are sealed and uploaded before the
    daemon exits 0: nothing is left in the spool."""
    d = s3_daemon(daemon_factory, s3, aws_env, seal_after_s=3600)
    capture_n(d, 100)
    status = d.status()
    assert status["spool"]["open_files"] == 1 and status["delivery"]["files_waiting"] == 0
    assert objects(s3) == {}
    assert d.stop() == 0, d.log()
    assert delivered_ids(s3) == list(range(100))
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_sigterm_with_s3_stalled_gives_up_after_the_shutdown_timeout_and_keeps_the_files(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_proxy: Any
) -> None:
    """S3 stalls while SIGTERM is handled: the daemon keeps trying until `s3.shutdown_timeout_s`
    (3 s here) runs out, cancels what is in flight, exits 0 and leaves whole sealed files in the
    spool; the next start uploads them, each record exactly once."""
    s3_proxy.set_mode("stall")
    d = s3_daemon(daemon_factory, s3, aws_env, endpoint_url=s3_proxy.endpoint_url, seal_after_s=3600)
    capture_n(d, 100)
    t0 = time.monotonic()
    assert d.stop() == 0, d.log()
    assert time.monotonic() - t0 >= 3.0  # it kept trying for the whole shutdown_timeout_s
    assert "shutdown: files left in the spool for the next start" in d.log()
    left = sorted(d.spool_dir.glob("*.jsonl"))
    assert left and not list(d.spool_dir.glob("*.part"))
    ids = sorted(
        int(json.loads(line)["eventMetadata"]["inferenceId"])
        for p in left
        for line in p.read_text().splitlines()
    )
    assert ids == list(range(100))
    s3_proxy.set_mode("pass")
    d.start()
    wait_for(lambda: d.status()["delivery"]["files_waiting"] == 0, timeout=60)
    assert d.stop() == 0
    assert delivered_ids(s3) == list(range(100))
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_a_dead_uploader_process_is_replaced_and_delivery_goes_on(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    """The uploader child is killed: the daemon keeps capturing, the next upload starts a new
    child, and every record arrives."""
    d = s3_daemon(daemon_factory, s3, aws_env)
    (first,) = psutil.Process(d.proc.pid).children()  # type: ignore[union-attr]
    first.kill()
    first.wait(10)
    capture_n(d, 50)
    wait_for(lambda: d.status()["delivery"]["files_waiting"] == 0 and delivered_ids(s3), timeout=30)
    (second,) = psutil.Process(d.proc.pid).children()  # type: ignore[union-attr]
    assert second.pid != first.pid
    assert d.stop() == 0
    assert delivered_ids(s3) == list(range(50))
    assert "S3 uploader process restarted" in d.log()


def test_the_uploader_process_does_not_outlive_a_killed_daemon(
    daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], s3_proxy: Any
) -> None:
    """SIGKILL to the daemon alone: its uploader sees its request pipe close, cancels what is in
    flight, aborts the open multipart upload and exits; nothing is left running or open."""
    d = multipart_daemon(daemon_factory, s3, aws_env, s3_proxy.endpoint_url, parts=1, seal_after_s=0.5)
    (uploader,) = psutil.Process(d.proc.pid).children()  # type: ignore[union-attr]
    body = b"1," * 300_000 + b"\n"
    with CaptureClient(d.socket_path, buffer_bytes=64 * 1024 * 1024) as client:
        for i in range(20):
            assert client.capture(body, None, request_content_type="text/csv", inference_id=str(i))
        assert client.flush(timeout=30)
    wait_for(
        lambda: s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads"), timeout=30, interval=0.005
    )
    s3_proxy.set_mode("stall")  # the upload cannot complete before the kill
    d.stop(signal.SIGKILL)
    s3_proxy.set_mode("pass")
    uploader.wait(30)
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    assert objects(s3) == {}
