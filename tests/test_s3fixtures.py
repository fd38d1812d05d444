"""The test helpers of `captured.testing` that stand in for S3: `MotoServer` (start, stop, its
lifetime, client arguments, environment, IAM switch), `FaultProxy` (its modes), `S3FaultProxy`
(its actions, its counts, its multipart `Initiated` times) and the bench's `SinkServer`.

What moto itself does is not checked here: the delivery tests rely on it where it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from captured.testing.daemon import wait_for
from captured.testing.proxy import FaultProxy, S3FaultProxy, s3_operation
from captured.testing.s3 import MotoServer, S3Sandbox
from captured.testing.s3sink import SinkServer


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def http_status(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    wait_for(predicate, timeout=timeout, interval=0.01)


def gone(pid: int) -> bool:
    """True once process `pid` has exited (a zombie left unreaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


# -- MotoServer ---------------------------------------------------------------------------


def test_moto_server_endpoint_reset_and_env(
    moto_server: MotoServer, s3: S3Sandbox, aws_env: dict[str, str]
) -> None:
    assert moto_server.endpoint_url.startswith("http://127.0.0.1:")
    assert moto_server.proc is not None and moto_server.proc.poll() is None
    assert s3.endpoint_url == moto_server.endpoint_url
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [s3.bucket]
    moto_server.reset()
    assert s3.client.list_buckets()["Buckets"] == []
    assert aws_env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert aws_env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert aws_env["AWS_ENDPOINT_URL_S3"] == moto_server.endpoint_url
    assert "PATH" in aws_env  # a full environment, usable as Popen(env=aws_env)


def test_standalone_server_with_small_parts_stops_cleanly() -> None:
    """A second, private server: moto reads S3_UPLOAD_PART_MIN_SIZE at start-up, so tiny
    multipart parts (fast daemon tests) need their own server."""
    server = MotoServer(env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "1024"}).start()
    try:
        c = server.boto3_client()
        c.create_bucket(Bucket="small-parts")
        uid = c.create_multipart_upload(Bucket="small-parts", Key="k")["UploadId"]
        etags = [
            c.upload_part(Bucket="small-parts", Key="k", UploadId=uid, PartNumber=n, Body=b"x" * 2048)["ETag"]
            for n in (1, 2, 3)
        ]
        parts = [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2, 3), etags, strict=True)]
        done = c.complete_multipart_upload(
            Bucket="small-parts", Key="k", UploadId=uid, MultipartUpload={"Parts": parts}
        )
        assert done["ETag"].endswith('-3"')
    finally:
        server.stop()
    assert server.proc is not None and server.proc.returncode == 0


def test_moto_server_exits_at_its_lifetime_cap() -> None:
    server = MotoServer(max_lifetime=5.0).start()
    try:
        assert server.proc is not None
        assert server.proc.wait(30) == 3  # os._exit(3) from the child's own timer
    finally:
        server.stop()


def test_moto_server_exits_when_its_parent_dies() -> None:
    """A parent killed without stopping its server: the server sees its stdin close and exits."""
    code = (
        "import os\n"
        "from captured.testing.s3 import MotoServer\n"
        "server = MotoServer().start()\n"
        "print(server.proc.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert parent.returncode == 0, parent.stderr
    pid = int(parent.stdout)
    wait_until(lambda: gone(pid), timeout=15)


def test_iam_auth_switch_and_users(moto_server: MotoServer, s3: S3Sandbox) -> None:
    """`iam_auth()` enforces IAM inside the block only; `create_iam_user` gives keys that work,
    for the actions it names."""
    reader = moto_server.create_iam_user(actions=("s3:GetObject", "s3:ListBucket"))
    writer = moto_server.create_iam_user(actions=("s3:PutObject", "s3:ListBucket"))
    with moto_server.iam_auth():
        with pytest.raises(ClientError) as exc:  # the dummy "testing" key is unknown to IAM
            s3.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        assert (error_code(exc.value), http_status(exc.value)) == ("InvalidAccessKeyId", 403)
        with pytest.raises(ClientError) as exc:
            moto_server.boto3_client(**reader).put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        assert (error_code(exc.value), http_status(exc.value)) == ("AccessDenied", 403)
        moto_server.boto3_client(**writer).put_object(Bucket=s3.bucket, Key="k", Body=b"x")
    s3.put_object(Bucket=s3.bucket, Key="k2", Body=b"x")  # auth off again


def test_client_kwargs_serve_aiobotocore_too(moto_server: MotoServer, s3: S3Sandbox) -> None:
    async def main() -> bytes:
        async with get_session().create_client("s3", **moto_server.client_kwargs()) as c:
            await c.put_object(Bucket=s3.bucket, Key="k", Body=b"hello")
            got = await c.get_object(Bucket=s3.bucket, Key="k")
            async with got["Body"] as body:
                data: bytes = await body.read()
                return data

    assert asyncio.run(main()) == b"hello"


# -- FaultProxy ---------------------------------------------------------------------------


def proxied(moto_server: MotoServer, proxy: FaultProxy, timeout: float = 0.5) -> Any:
    return moto_server.boto3_client(
        endpoint_url=proxy.endpoint_url, connect_timeout=timeout, read_timeout=timeout
    )


def test_proxy_pass_counts(moto_server: MotoServer, s3: S3Sandbox, s3_proxy: FaultProxy) -> None:
    c = proxied(moto_server, s3_proxy)
    c.put_object(Bucket=s3.bucket, Key="k", Body=b"z" * 10000)
    assert c.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == b"z" * 10000
    # moto answers "Connection: close": one TCP connection per request, no keep-alive reuse.
    assert s3_proxy.accepted == 2
    assert s3_proxy.bytes_up > 10000 and s3_proxy.bytes_down > 10000
    wait_until(lambda: s3_proxy.active == 0)


def test_proxy_refuse_then_pass(moto_server: MotoServer, s3: S3Sandbox, s3_proxy: FaultProxy) -> None:
    c = proxied(moto_server, s3_proxy)
    s3_proxy.set_mode("refuse")
    # The kernel completes the handshake, then the proxy resets: botocore reports a closed
    # connection (GET) or a connection error (PUT, reset while sending the body).
    for call in (
        lambda: c.get_object(Bucket=s3.bucket, Key="k"),
        lambda: c.put_object(Bucket=s3.bucket, Key="k", Body=b"x"),
    ):
        with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
            call()
    assert s3_proxy.refused == 2 and s3_proxy.bytes_up == 0
    s3_proxy.set_mode("pass")
    c.put_object(Bucket=s3.bucket, Key="k", Body=b"x")


def test_proxy_stall_read_timeout_then_pass(
    moto_server: MotoServer, s3: S3Sandbox, s3_proxy: FaultProxy
) -> None:
    c = proxied(moto_server, s3_proxy, timeout=0.3)
    s3_proxy.set_mode("stall")
    t0 = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        c.get_object(Bucket=s3.bucket, Key="k")
    # PUT: botocore waits ~1 s for "100 Continue", sends the body anyway, then times out.
    with pytest.raises((ReadTimeoutError, ConnectionClosedError)):
        c.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
    assert time.monotonic() - t0 < 5
    assert s3_proxy.active == 2 and s3_proxy.bytes_up == 0  # held open, nothing forwarded
    s3_proxy.set_mode("pass")
    c.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
    assert c.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == b"x"


RAW_REQUEST = b"GET /moto-api/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def test_proxy_stall_and_pass_apply_to_existing_connections(s3_proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", s3_proxy.port), timeout=5) as sock:
        wait_until(lambda: s3_proxy.active == 1)
        s3_proxy.set_mode("stall")
        sock.sendall(RAW_REQUEST)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        s3_proxy.set_mode("pass")  # the held request goes through now
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 400")  # moto: "Need to POST to reset"


def test_proxy_refuse_cuts_existing_connections(s3_proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", s3_proxy.port), timeout=5) as sock:
        wait_until(lambda: s3_proxy.active == 1)
        s3_proxy.set_mode("refuse")
        assert s3_proxy.active == 0
        with contextlib.suppress(ConnectionResetError):  # RST, or at least EOF
            assert sock.recv(100) == b""


def test_proxy_stop_releases_thread_and_sockets(moto_server: MotoServer) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    threads, before = threading.active_count(), fds()
    proxy = FaultProxy(moto_server.host, moto_server.port).start()
    socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    wait_until(lambda: proxy.active == 3)
    socks[0].sendall(RAW_REQUEST)
    proxy.set_mode("stall")
    socks.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
    wait_until(lambda: proxy.accepted == 4)
    proxy.stop()
    assert proxy.active == 0
    for s in socks:
        s.close()
    assert threading.active_count() == threads
    assert fds() == before
    with pytest.raises(ConnectionRefusedError):  # a stopped proxy: a real ECONNREFUSED
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


# -- S3FaultProxy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "query", "operation"),
    [
        ("POST", {"uploads": ""}, "CreateMultipartUpload"),
        ("POST", {"uploadId": "u"}, "CompleteMultipartUpload"),
        ("PUT", {"partNumber": "1", "uploadId": "u"}, "UploadPart"),
        ("PUT", {}, "PutObject"),
        ("DELETE", {"uploadId": "u"}, "AbortMultipartUpload"),
        ("GET", {"uploads": ""}, "ListMultipartUploads"),
        ("GET", {"list-type": "2"}, "Get"),
        ("HEAD", {}, "Head"),
    ],
)
def test_s3_operation_names(method: str, query: dict[str, str], operation: str) -> None:
    assert s3_operation(method, query) == operation


def test_s3_fault_proxy_actions(moto_server: MotoServer, s3: S3Sandbox, s3_fault_proxy: S3FaultProxy) -> None:
    """`fail` never reaches S3, `cut` does (its response is lost), `reset` does not; the rule
    sees each operation's count, and `done` counts what was done."""
    c = moto_server.boto3_client(endpoint_url=s3_fault_proxy.endpoint_url, read_timeout=5)
    s3_fault_proxy.rule = lambda op, n: "fail" if op == "PutObject" and n == 1 else "pass"
    with pytest.raises(ClientError) as exc:
        c.put_object(Bucket=s3.bucket, Key="failed", Body=b"x")
    assert (error_code(exc.value), http_status(exc.value)) == ("SlowDown", 503)
    c.put_object(Bucket=s3.bucket, Key="passed", Body=b"x")  # n == 2
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket)["Contents"]] == ["passed"]
    assert (s3_fault_proxy.done("PutObject", "fail"), s3_fault_proxy.done("PutObject", "pass")) == (1, 1)

    s3_fault_proxy.rule = lambda op, n: "cut" if op == "CreateMultipartUpload" else "pass"
    with pytest.raises(ConnectionClosedError):
        c.create_multipart_upload(Bucket=s3.bucket, Key="cut")
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3.bucket)["Uploads"]] == ["cut"]

    s3_fault_proxy.rule = lambda op, n: "reset" if op == "PutObject" else "pass"
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        c.put_object(Bucket=s3.bucket, Key="reset", Body=b"x")
    assert "reset" not in [o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert s3_fault_proxy.counts["PutObject"] == 3
    assert s3_fault_proxy.seen == {
        ("PutObject", "fail"): 1,
        ("PutObject", "pass"): 1,
        ("CreateMultipartUpload", "cut"): 1,
        ("PutObject", "reset"): 1,
    }


def test_s3_fault_proxy_reports_when_it_saw_each_upload_created(
    moto_server: MotoServer, s3: S3Sandbox, s3_fault_proxy: S3FaultProxy
) -> None:
    """moto gives every multipart upload one fixed `Initiated` time; through the proxy, an upload
    created through it is listed with the time the proxy saw it created."""
    c = moto_server.boto3_client(endpoint_url=s3_fault_proxy.endpoint_url)
    before = datetime.datetime.now(datetime.UTC)
    c.create_multipart_upload(Bucket=s3.bucket, Key="k")
    s3.create_multipart_upload(Bucket=s3.bucket, Key="direct")  # not through the proxy
    listed = {u["Key"]: u["Initiated"] for u in c.list_multipart_uploads(Bucket=s3.bucket)["Uploads"]}
    assert before - datetime.timedelta(seconds=1) <= listed["k"] <= datetime.datetime.now(datetime.UTC)
    direct = s3.list_multipart_uploads(Bucket=s3.bucket)["Uploads"]
    assert {u["Key"]: u["Initiated"] for u in direct}["direct"] == listed["direct"]


def test_s3_fault_proxy_stop_releases_its_thread(moto_server: MotoServer) -> None:
    threads = threading.active_count()
    with S3FaultProxy(moto_server.endpoint_url) as proxy:
        assert moto_server.boto3_client(endpoint_url=proxy.endpoint_url).list_buckets() is not None
    assert threading.active_count() == threads
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


# -- SinkServer ---------------------------------------------------------------------------


def test_s3_sink_answers_what_the_uploader_and_the_bench_ask() -> None:
    """The sink's S3 subset through boto3: buckets, objects with a CRC32 checked, multipart uploads
    completed and aborted, listings, reads, reset."""
    server = SinkServer().start()
    try:
        s3 = server.boto3_client()
        s3.create_bucket(Bucket="b")
        s3.put_object(Bucket="b", Key="e/v/2021/one.jsonl", Body=b"a\nb\n", ChecksumAlgorithm="CRC32")
        with pytest.raises(ClientError, match="BadDigest"):
            s3.put_object(Bucket="b", Key="bad", Body=b"x", ChecksumCRC32="AAAAAA==")
        parts = []
        mpu = s3.create_multipart_upload(Bucket="b", Key="e/v/2021/two.jsonl")
        for number, body in ((1, b"1\n" * 1000), (2, b"2\n" * 10)):
            kw = {"Bucket": "b", "Key": "e/v/2021/two.jsonl", "UploadId": mpu["UploadId"]}
            etag = s3.upload_part(**kw, PartNumber=number, Body=body, ChecksumAlgorithm="CRC32")["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        aborted = s3.create_multipart_upload(Bucket="b", Key="left")
        assert {u["Key"] for u in s3.list_multipart_uploads(Bucket="b")["Uploads"]} == {
            "e/v/2021/two.jsonl",
            "left",
        }
        s3.abort_multipart_upload(Bucket="b", Key="left", UploadId=aborted["UploadId"])
        s3.complete_multipart_upload(
            Bucket="b", Key="e/v/2021/two.jsonl", UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
        )
        assert "Uploads" not in s3.list_multipart_uploads(Bucket="b")
        listing = s3.list_objects_v2(Bucket="b", Prefix="e/")["Contents"]
        assert [(o["Key"], o["Size"]) for o in listing] == [
            ("e/v/2021/one.jsonl", 4),
            ("e/v/2021/two.jsonl", 2020),
        ]
        assert (
            s3.get_object(Bucket="b", Key="e/v/2021/two.jsonl")["Body"].read() == b"1\n" * 1000 + b"2\n" * 10
        )
        assert s3.head_object(Bucket="b", Key="e/v/2021/one.jsonl")["ContentLength"] == 4
        server.reset()
        with pytest.raises(ClientError):
            s3.list_objects_v2(Bucket="b")
    finally:
        server.stop()
