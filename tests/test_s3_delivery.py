"""Delivery to S3: the real daemon uploads to a real S3-compatible server (moto) on 127.0.0.1.

The daemon runs in the test's own event loop (`captured.testing.inprocess`); its uploader child
process inherits this process's environment (`s3_env`) and writes its log lines to the inherited
stderr (`service_log`). A subprocess daemon is kept where a test kills the daemon (SIGKILL) or
restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from captured import CaptureClient
from captured.client.aio import AsyncCaptureClient
from captured.service.config import Config
from captured.service.daemon import Daemon
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.inprocess import FakeClock, eventually, run_daemon, status_doc, write_config
from captured.testing.proxy import S3FaultProxy
from captured.testing.s3 import S3Sandbox

KEY = re.compile(
    r"captures/test-endpoint/AllTraffic/(\d{4})/(\d\d)/(\d\d)/(\d\d)/\d\d-\d\d-\d{3}-[0-9a-f-]{36}\.jsonl"
)


@pytest.fixture
def s3_env(aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`aws_env` made this process's environment, which the in-process daemon's uploader child
    inherits: its variables set, other AWS_* and proxy variables removed (as `aws_env` leaves
    them out of a subprocess daemon's environment)."""
    for name in list(os.environ):
        stray = name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy")
        if stray and name not in aws_env:
            monkeypatch.delenv(name)
    for name, value in aws_env.items():
        monkeypatch.setenv(name, value)
    return aws_env


class ServiceLog:
    """What a subprocess daemon's log holds, for a daemon in this process: the daemon's lines
    (Python logging, at INFO as `serve` logs) and its uploader child's (written to the stderr it
    inherited from this process, at the level the daemon's loggers had when it started)."""

    def __init__(self, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
        self.caplog = caplog
        self.capfd = capfd
        self.child = ""
        caplog.set_level("INFO", logger="captured")  # before the daemon starts its uploader

    def text(self) -> str:
        self.child += self.capfd.readouterr().err
        ours = [r for r in self.caplog.records if not r.name.startswith("captured.client")]
        return "".join(f"{r.levelname} {r.name}: {r.getMessage()}\n" for r in ours) + self.child


@pytest.fixture
def service_log(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> ServiceLog:
    return ServiceLog(caplog, capfd)


def s3_settings(
    s3: S3Sandbox,
    kms: str | None = None,
    endpoint_url: str | None = None,
    bucket: str | None = None,
    extra_s3: str = "",
    seal_after_s: float = 0.5,
) -> tuple[str, str]:
    """The config's extra TOML and its `[DataCaptureConfig]`, for `DaemonProcess` or `write_config`."""
    extra_toml = (
        f"[spool]\nmax_file_age_s = {seal_after_s}\n"
        f'[s3]\nendpoint_url = "{endpoint_url or s3.endpoint_url}"\nregion = "us-east-1"\n'
        "shutdown_timeout_s = 3\n" + extra_s3
    )
    data_capture = (
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "s3://{bucket or s3.bucket}/captures/"\n'  # a trailing "/" must not give "//"
        'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        + (f'KmsKeyId = "{kms}"\n' if kms else "")
        + '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return extra_toml, data_capture


def s3_daemon(daemon_factory: Any, s3: S3Sandbox, aws_env: dict[str, str], **kw: Any) -> DaemonProcess:
    """A running subprocess daemon delivering to S3 (`s3_settings`' keywords)."""
    extra_toml, data_capture = s3_settings(s3, **kw)
    d: DaemonProcess = daemon_factory(extra_toml=extra_toml, env=aws_env)
    d.write_config(data_capture)
    return d.start()


def s3_config(root: Path, s3: S3Sandbox, **kw: Any) -> Config:
    """The same configuration for an in-process daemon under `root` (`s3_settings`' keywords)."""
    extra_toml, data_capture = s3_settings(s3, **kw)
    return write_config(root, extra_toml, data_capture)


def objects(s3: S3Sandbox) -> dict[str, bytes]:
    listed = s3.client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])
    return {o["Key"]: s3.client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read() for o in listed}


def spool_names(cfg: Config) -> set[str]:
    return {p.name for p in Path(cfg.spool_dir).iterdir()}


def test_records_reach_s3_under_sagemaker_keys_exactly_once(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str]
) -> None:
    """Records of two hours are captured, the daemon stops (seal + deliver), and each record is in
    exactly one object under prefix/endpoint/variant/yyyy/mm/dd/hh/; the spool is empty."""
    cfg = s3_config(short_tmp, s3, kms="alias/captures")
    base = dt.datetime(2026, 3, 1, 10, 59, 58, tzinfo=dt.UTC).timestamp()

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()), AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(400):
                client.capture(
                    f"{i},1\n",
                    "0",
                    request_content_type="text/csv",
                    response_content_type="text/csv",
                    inference_id=str(i),
                    inference_time=base + i * 0.01,
                )
            assert await client.flush(timeout=10)

    asyncio.run(main())  # run_daemon stopped the daemon (as SIGTERM does) and checked that it exited 0
    found = objects(s3)
    assert found
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
    assert spool_names(cfg) == {".lock", ".journal"}


def multipart_settings(
    s3: S3Sandbox, endpoint_url: str, *, parts: int, seal_after_s: float = 60.0
) -> tuple[str, str]:
    """Capturing Input only, with 5 MiB multipart threshold and parts (`s3_settings`' pair)."""
    extra_toml = (
        f"[spool]\nmax_file_age_s = {seal_after_s}\n"
        f'[s3]\nendpoint_url = "{endpoint_url}"\nregion = "us-east-1"\n'
        f"multipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\nmax_concurrent_parts = {parts}\n"
    )
    data_capture = (
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "s3://{s3.bucket}/captures"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return extra_toml, data_capture


def multipart_daemon(
    daemon_factory: Any,
    s3: S3Sandbox,
    aws_env: dict[str, str],
    endpoint_url: str,
    *,
    parts: int,
    seal_after_s: float = 60.0,
) -> DaemonProcess:
    """A running subprocess daemon capturing Input only, with 5 MiB multipart threshold and parts."""
    extra_toml, data_capture = multipart_settings(s3, endpoint_url, parts=parts, seal_after_s=seal_after_s)
    d: DaemonProcess = daemon_factory(extra_toml=extra_toml, env=aws_env)
    d.write_config(data_capture)
    return d.start()


def test_a_large_file_goes_up_as_multipart_with_parallel_parts_and_a_small_one_with_put_object(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], s3_fault_proxy: S3FaultProxy
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
    cfg = write_config(short_tmp, *multipart_settings(s3, s3_fault_proxy.endpoint_url, parts=4))
    body = b"1," * 300_000 + b"\n"  # 600 KB per record
    big_hour = dt.datetime(2026, 3, 1, 10, 0, 1, tzinfo=dt.UTC).timestamp()
    small_hour = dt.datetime(2026, 3, 1, 12, 0, 1, tzinfo=dt.UTC).timestamp()

    async def main() -> None:
        async with (
            run_daemon(cfg, clock=FakeClock()),
            AsyncCaptureClient(cfg.socket_path, buffer_bytes=64 * 1024 * 1024) as client,
        ):
            for _ in range(28):  # ~16.8 MB in hour 10: four 5 MiB parts
                assert client.capture(body, None, request_content_type="text/csv", inference_time=big_hour)
            client.capture(b"1,2\n", None, request_content_type="text/csv", inference_time=small_hour)
            assert await client.flush(timeout=30)

    asyncio.run(main())  # stopping seals both files and uploads them; run_daemon checked exit 0
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


async def send_n(socket_path: str, n: int, start: int = 0) -> None:
    """`capture_n` for a daemon in this event loop."""
    async with AsyncCaptureClient(socket_path) as client:
        for i in range(start, start + n):
            client.capture(
                f"{i},1\n",
                "0",
                request_content_type="text/csv",
                response_content_type="text/csv",
                inference_id=str(i),
            )
        assert await client.flush(timeout=10)


def delivered_ids(s3: S3Sandbox) -> list[int]:
    return sorted(
        int(json.loads(line)["eventMetadata"]["inferenceId"])
        for body in objects(s3).values()
        for line in body.splitlines()
    )


def failures(daemon: Daemon, cause: str) -> int:
    return int(status_doc(daemon)["delivery"]["failures"].get(cause, 0))


def all_delivered(daemon: Daemon) -> bool:
    """Nothing waits for delivery and no file is open."""
    st = status_doc(daemon)
    return bool(st["delivery"]["files_waiting"] == 0 and st["spool"]["open_files"] == 0)


async def eventually_also(on_loop: Callable[[], bool], in_thread: Callable[[], Any], timeout: float) -> None:
    """`eventually(lambda: on_loop() and in_thread())`, with `in_thread` (it asks S3, which
    blocks) in a thread: the daemon's loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not (on_loop() and await asyncio.to_thread(in_thread)):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_an_s3_outage_loses_and_duplicates_nothing(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], s3_proxy: Any, service_log: ServiceLog
) -> None:
    """S3 refuses connections while records are captured and files sealed: the files wait in the
    spool, failures are counted as retryable; when S3 is back, delivery resumes by itself and
    every record is in S3 exactly once."""
    s3_proxy.set_mode("refuse")
    cfg = s3_config(short_tmp, s3, endpoint_url=s3_proxy.endpoint_url)

    async def main() -> None:
        # The real clock: files are sealed by age and retried with backoff as time passes.
        async with run_daemon(cfg) as daemon:
            await send_n(cfg.socket_path, 100)
            await eventually(lambda: failures(daemon, "connection") >= 2, timeout=30)
            await send_n(cfg.socket_path, 100, start=100)
            assert status_doc(daemon)["delivery"]["files_waiting"] >= 1
            assert await asyncio.to_thread(objects, s3) == {}
            s3_proxy.set_mode("pass")
            await eventually(lambda: all_delivered(daemon), timeout=60)
            assert await asyncio.to_thread(delivered_ids, s3) == list(range(200))

    asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert delivered_ids(s3) == list(range(200))
    log = service_log.text()
    assert "delivery of" in log and "(connection), retrying" in log


def test_a_missing_bucket_is_a_counted_fatal_failure_and_the_files_stay(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], service_log: ServiceLog
) -> None:
    cfg = s3_config(short_tmp, s3, bucket="no-such-bucket-here")

    async def main() -> None:
        async with run_daemon(cfg) as daemon:  # the real clock: the file is sealed by age
            await send_n(cfg.socket_path, 10)
            await eventually(lambda: failures(daemon, "no_such_bucket") >= 1, timeout=30)
            assert status_doc(daemon)["delivery"]["files_waiting"] == 1
            log = service_log.text()
            assert log.count("(no_such_bucket)") == 1 and "until the cause is fixed" in log

    asyncio.run(main())  # shutdown gives up after s3.shutdown_timeout_s, exit 0; the file is kept
    assert len(list(Path(cfg.spool_dir).glob("*.jsonl"))) == 1


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
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], service_log: ServiceLog
) -> None:
    """With IAM enforced, the daemon's credentials are refused (403): one log line naming the
    cause, failures counted as a fatal cause, the sealed file kept in the spool; once IAM lets
    the credentials through, the file is delivered at the slow retry pace, without a restart."""
    cfg = s3_config(short_tmp, s3, extra_s3="fatal_retry_s = 1\n")

    async def main() -> None:
        async with run_daemon(cfg) as daemon:  # the real clock: sealed by age, retried every second
            with s3.server.iam_auth():
                await send_n(cfg.socket_path, 10)
                await eventually(lambda: failures(daemon, "bad_credentials") >= 2, timeout=30)
                assert (
                    status_doc(daemon)["delivery"]["files_waiting"] == 1
                )  # (the test's own client is refused too)
            log = service_log.text()
            assert log.count("(bad_credentials)") == 1 and "InvalidAccessKeyId" in log
            # The permission is fixed (IAM no longer enforced): delivery resumes without a restart.
            await eventually(lambda: status_doc(daemon)["delivery"]["files_waiting"] == 0, timeout=30)
            assert await asyncio.to_thread(delivered_ids, s3) == list(range(10))

    asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0


def test_a_stalled_s3_endpoint_times_out_and_delivery_resumes(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], s3_proxy: Any
) -> None:
    """The endpoint accepts connections but never answers: each request times out (a retryable
    cause), the files wait; once it answers again every record arrives exactly once."""
    s3_proxy.set_mode("stall")
    cfg = s3_config(short_tmp, s3, endpoint_url=s3_proxy.endpoint_url, extra_s3="request_timeout_s = 1\n")

    async def main() -> None:
        async with run_daemon(cfg) as daemon:  # the real clock: sealed by age, retried with backoff
            await send_n(cfg.socket_path, 50)
            await eventually(lambda: failures(daemon, "timeout") >= 1, timeout=30)
            assert status_doc(daemon)["delivery"]["files_waiting"] >= 1
            s3_proxy.set_mode("pass")
            await eventually(lambda: all_delivered(daemon), timeout=60)

    asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert delivered_ids(s3) == list(range(50))


def test_sigterm_seals_open_files_and_uploads_them_before_exit(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str]
) -> None:
    """Files still open at SIGTERM (rotation is an hour away) are sealed and uploaded before the
    daemon exits 0: nothing is left in the spool. (`run_daemon` stops the daemon as SIGTERM does;
    the signal itself is the subprocess tests' below.)"""
    cfg = s3_config(short_tmp, s3, seal_after_s=3600)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send_n(cfg.socket_path, 100)
            status = status_doc(daemon)
            assert status["spool"]["open_files"] == 1 and status["delivery"]["files_waiting"] == 0
            assert await asyncio.to_thread(objects, s3) == {}

    asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert delivered_ids(s3) == list(range(100))
    assert spool_names(cfg) == {".lock", ".journal"}


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


def uploader_processes() -> list[psutil.Process]:
    """The S3 uploader processes among this process's children (the in-process daemon's; the
    moto server is a child too). One that has died and not yet been reaped is not counted."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # (ZombieProcess too)
            if "captured.delivery.uploader_child" in child.cmdline():
                found.append(child)
    return found


def test_a_dead_uploader_process_is_replaced_and_delivery_goes_on(
    short_tmp: Path, s3: S3Sandbox, s3_env: dict[str, str], service_log: ServiceLog
) -> None:
    """The uploader child is killed: the daemon keeps capturing, the next upload starts a new
    child, and every record arrives."""
    cfg = s3_config(short_tmp, s3)

    async def main() -> None:
        async with run_daemon(cfg) as daemon:  # the real clock: the file is sealed by age
            (first,) = uploader_processes()
            first.kill()
            # Gone once the daemon's side has reaped it (psutil's wait() would reap it itself).
            await eventually(lambda: not first.is_running(), timeout=10)
            await send_n(cfg.socket_path, 50)
            await eventually_also(
                lambda: status_doc(daemon)["delivery"]["files_waiting"] == 0,
                lambda: delivered_ids(s3),
                timeout=30,
            )
            (second,) = uploader_processes()
            assert second.pid != first.pid

    asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert delivered_ids(s3) == list(range(50))
    assert "S3 uploader process restarted" in service_log.text()


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
