"""The S3 test fixtures, and what moto's server mode really supports over HTTP.

Each test documents one capability (or quirk) of moto 5 in server mode, as seen by boto3
and aiobotocore 3.x; a failure after a moto/botocore upgrade means the behaviour changed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    FlexibleChecksumError,
    ReadTimeoutError,
)
from s3fixtures import FaultProxy, MotoServer, S3Sandbox

MiB = 1024 * 1024
PART = 5 * MiB


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(struct.pack(">I", zlib.crc32(data))).decode()


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def error_code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def http_status(exc: ClientError) -> int:
    return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- the fixtures themselves ------------------------------------------------------------


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


# -- plain objects and errors -----------------------------------------------------------


def test_put_object_roundtrip(s3: S3Sandbox) -> None:
    body = os.urandom(1000)
    put = s3.put_object(Bucket=s3.bucket, Key="a/b.jsonl", Body=body, ContentType="application/jsonlines")
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = s3.get_object(Bucket=s3.bucket, Key="a/b.jsonl")
    assert got["Body"].read() == body
    assert got["ContentType"] == "application/jsonlines"


def test_error_codes_for_missing_bucket_and_key(s3: S3Sandbox) -> None:
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")
    assert (error_code(exc.value), http_status(exc.value)) == ("NoSuchBucket", 404)
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=s3.bucket, Key="missing")
    assert (error_code(exc.value), http_status(exc.value)) == ("NoSuchKey", 404)
    with pytest.raises(ClientError) as exc:  # HEAD has no body: the code is just "404"
        s3.head_object(Bucket=s3.bucket, Key="missing")
    assert (error_code(exc.value), http_status(exc.value)) == ("404", 404)


# -- multipart --------------------------------------------------------------------------


def test_multipart_parallel_parts(s3: S3Sandbox) -> None:
    data = os.urandom(3 * PART + 1234)
    chunks = [data[i : i + PART] for i in range(0, len(data), PART)]
    uid = s3.create_multipart_upload(Bucket=s3.bucket, Key="mp")["UploadId"]

    def upload(n: int) -> dict[str, Any]:
        r = s3.upload_part(Bucket=s3.bucket, Key="mp", UploadId=uid, PartNumber=n + 1, Body=chunks[n])
        return {"PartNumber": n + 1, "ETag": r["ETag"]}

    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(upload, range(len(chunks))))
    done = s3.complete_multipart_upload(
        Bucket=s3.bucket, Key="mp", UploadId=uid, MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].endswith('-4"')
    # The usual S3 multipart ETag: md5 of the concatenated binary part md5s, "-N".
    md5s = b"".join(hashlib.md5(c).digest() for c in chunks)
    assert done["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-4"'
    assert s3.get_object(Bucket=s3.bucket, Key="mp")["Body"].read() == data
    assert s3.head_object(Bucket=s3.bucket, Key="mp", PartNumber=1)["PartsCount"] == 4


def test_multipart_errors_too_small_and_wrong_etag(s3: S3Sandbox) -> None:
    uid = s3.create_multipart_upload(Bucket=s3.bucket, Key="small")["UploadId"]
    e1 = s3.upload_part(Bucket=s3.bucket, Key="small", UploadId=uid, PartNumber=1, Body=b"a" * 100)["ETag"]
    e2 = s3.upload_part(Bucket=s3.bucket, Key="small", UploadId=uid, PartNumber=2, Body=b"b" * 100)["ETag"]
    parts = [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]
    with pytest.raises(ClientError) as exc:  # non-last part < S3_UPLOAD_PART_MIN_SIZE (5 MiB)
        s3.complete_multipart_upload(
            Bucket=s3.bucket, Key="small", UploadId=uid, MultipartUpload={"Parts": parts}
        )
    assert (error_code(exc.value), http_status(exc.value)) == ("EntityTooSmall", 400)
    with pytest.raises(ClientError) as exc:
        s3.complete_multipart_upload(
            Bucket=s3.bucket,
            Key="small",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"0"'}]},
        )
    assert error_code(exc.value) == "InvalidPart"
    # A single small part is fine (the last part may be small).
    s3.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="small",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}]},
    )
    assert s3.get_object(Bucket=s3.bucket, Key="small")["Body"].read() == b"a" * 100


def test_list_and_abort_multipart_uploads(s3: S3Sandbox) -> None:
    a = s3.create_multipart_upload(Bucket=s3.bucket, Key="x/a")["UploadId"]
    b = s3.create_multipart_upload(Bucket=s3.bucket, Key="y/b")["UploadId"]
    s3.upload_part(Bucket=s3.bucket, Key="x/a", UploadId=a, PartNumber=1, Body=b"1")
    listed = s3.list_multipart_uploads(Bucket=s3.bucket)["Uploads"]
    assert {(u["Key"], u["UploadId"]) for u in listed} == {("x/a", a), ("y/b", b)}
    # QUIRK: moto reports a constant "Initiated" (2010-11-10), not the creation time, so
    # "abort uploads older than T" logic sees every upload as stale.
    assert all(isinstance(u["Initiated"], datetime) for u in listed)
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3.bucket, Prefix="x/")["Uploads"]] == ["x/a"]
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=s3.bucket, Key="x/a", UploadId=a)["Parts"]] == [1]

    s3.abort_multipart_upload(Bucket=s3.bucket, Key="x/a", UploadId=a)
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=s3.bucket)["Uploads"]] == [b]
    with pytest.raises(ClientError) as exc:
        s3.abort_multipart_upload(Bucket=s3.bucket, Key="x/a", UploadId=a)
    assert (error_code(exc.value), http_status(exc.value)) == ("NoSuchUpload", 404)
    # QUIRK: UploadPart / CompleteMultipartUpload on an aborted (unknown) upload id give an
    # HTTP 500 from moto, not 404 NoSuchUpload as on AWS (and botocore retries 500s).
    with pytest.raises(ClientError) as exc:
        s3.upload_part(Bucket=s3.bucket, Key="x/a", UploadId=a, PartNumber=2, Body=b"2")
    assert http_status(exc.value) in (404, 500)
    s3.abort_multipart_upload(Bucket=s3.bucket, Key="y/b", UploadId=b)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=s3.bucket)


# -- SSE-KMS ----------------------------------------------------------------------------


def test_sse_kms_any_key_id_is_accepted_and_echoed(s3: S3Sandbox) -> None:
    """moto does NOT check the KMS key exists: any SSEKMSKeyId string is stored and echoed."""
    key_id = "arn:aws:kms:us-east-1:123456789012:key/does-not-exist"
    put = s3.put_object(
        Bucket=s3.bucket, Key="k", Body=b"x", ServerSideEncryption="aws:kms", SSEKMSKeyId=key_id
    )
    assert (put["ServerSideEncryption"], put["SSEKMSKeyId"]) == ("aws:kms", key_id)
    head = s3.head_object(Bucket=s3.bucket, Key="k")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", key_id)
    assert s3.get_object(Bucket=s3.bucket, Key="k")["SSEKMSKeyId"] == key_id
    # Without SSEKMSKeyId: aws:kms, but no key id at all (AWS would report the aws/s3 key).
    s3.put_object(Bucket=s3.bucket, Key="k2", Body=b"x", ServerSideEncryption="aws:kms")
    head = s3.head_object(Bucket=s3.bucket, Key="k2")
    assert head["ServerSideEncryption"] == "aws:kms" and "SSEKMSKeyId" not in head


def test_sse_kms_with_real_key_and_multipart(moto_server: MotoServer, s3: S3Sandbox) -> None:
    kms = moto_server.boto3_client("kms")
    key_arn = kms.create_key(Description="capture")["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName="alias/capture", TargetKeyId=key_arn)
    sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key_arn}

    up = s3.create_multipart_upload(Bucket=s3.bucket, Key="mp", **sse)
    assert (up["ServerSideEncryption"], up["SSEKMSKeyId"]) == ("aws:kms", key_arn)
    uid = up["UploadId"]
    parts = []
    for n, body in ((1, b"a" * PART), (2, b"b" * 10)):
        r = s3.upload_part(Bucket=s3.bucket, Key="mp", UploadId=uid, PartNumber=n, Body=body)
        assert r["SSEKMSKeyId"] == key_arn
        parts.append({"PartNumber": n, "ETag": r["ETag"]})
    done = s3.complete_multipart_upload(
        Bucket=s3.bucket, Key="mp", UploadId=uid, MultipartUpload={"Parts": parts}
    )
    assert (done["ServerSideEncryption"], done["SSEKMSKeyId"]) == ("aws:kms", key_arn)
    head = s3.head_object(Bucket=s3.bucket, Key="mp")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"], head["ContentLength"]) == (
        "aws:kms",
        key_arn,
        PART + 10,
    )
    # An alias is stored verbatim, not resolved to the key ARN.
    s3.put_object(
        Bucket=s3.bucket, Key="al", Body=b"x", ServerSideEncryption="aws:kms", SSEKMSKeyId="alias/capture"
    )
    assert s3.head_object(Bucket=s3.bucket, Key="al")["SSEKMSKeyId"] == "alias/capture"


def test_bucket_default_kms_applies_to_put_but_not_multipart(s3: S3Sandbox) -> None:
    s3.put_bucket_encryption(
        Bucket=s3.bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [
                {
                    "ApplyServerSideEncryptionByDefault": {
                        "SSEAlgorithm": "aws:kms",
                        "KMSMasterKeyID": "bucket-key",
                    }
                }
            ]
        },
    )
    s3.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
    head = s3.head_object(Bucket=s3.bucket, Key="k")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", "bucket-key")
    # QUIRK: CreateMultipartUpload ignores the bucket default (AWS applies it).
    up = s3.create_multipart_upload(Bucket=s3.bucket, Key="mp")
    assert "ServerSideEncryption" not in up
    s3.abort_multipart_upload(Bucket=s3.bucket, Key="mp", UploadId=up["UploadId"])


# -- checksums --------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "digest"), [("CRC32", crc32_b64), ("SHA256", sha256_b64)])
def test_put_checksum_stored_and_returned(s3: S3Sandbox, algorithm: str, digest: Any) -> None:
    body = os.urandom(4096)
    put = s3.put_object(Bucket=s3.bucket, Key="k", Body=body, ChecksumAlgorithm=algorithm)
    assert put[f"Checksum{algorithm}"] == digest(body)
    head = s3.head_object(Bucket=s3.bucket, Key="k", ChecksumMode="ENABLED")
    assert head[f"Checksum{algorithm}"] == digest(body)
    got = s3.get_object(Bucket=s3.bucket, Key="k", ChecksumMode="ENABLED")  # botocore validates it
    assert got["Body"].read() == body
    assert f"Checksum{algorithm}" not in s3.head_object(Bucket=s3.bucket, Key="k")  # only with ChecksumMode


def test_botocore_sends_crc32_by_default(s3: S3Sandbox) -> None:
    """botocore >= 1.36 (request_checksum_calculation=when_supported) adds CRC32 itself."""
    s3.put_object(Bucket=s3.bucket, Key="k", Body=b"hello")
    assert s3.head_object(Bucket=s3.bucket, Key="k", ChecksumMode="ENABLED")["ChecksumCRC32"] == crc32_b64(
        b"hello"
    )


def test_moto_never_verifies_checksums_or_content_md5(s3: S3Sandbox) -> None:
    """QUIRK: moto trusts whatever checksum/MD5 the client sends (AWS: 400 BadDigest/InvalidRequest)."""
    wrong_crc = crc32_b64(b"something else")
    # Wrong value plus the algorithm: accepted, stored and echoed ...
    put = s3.put_object(
        Bucket=s3.bucket, Key="c", Body=b"hello", ChecksumAlgorithm="CRC32", ChecksumCRC32=wrong_crc
    )
    assert put["ChecksumCRC32"] == wrong_crc
    assert s3.head_object(Bucket=s3.bucket, Key="c", ChecksumMode="ENABLED")["ChecksumCRC32"] == wrong_crc
    # ... and only botocore's response validation notices it on download.
    with pytest.raises(FlexibleChecksumError):
        s3.get_object(Bucket=s3.bucket, Key="c", ChecksumMode="ENABLED")["Body"].read()
    # Wrong value without ChecksumAlgorithm: accepted and not stored at all.
    s3.put_object(Bucket=s3.bucket, Key="c2", Body=b"hello", ChecksumCRC32=wrong_crc)
    assert "ChecksumCRC32" not in s3.head_object(Bucket=s3.bucket, Key="c2", ChecksumMode="ENABLED")
    s3.put_object(
        Bucket=s3.bucket,
        Key="s",
        Body=b"hello",
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=sha256_b64(b"other"),
    )
    # Wrong Content-MD5 (botocore does send it): accepted.
    put = s3.put_object(Bucket=s3.bucket, Key="m", Body=b"hello", ContentMD5=md5_b64(b"other"))
    assert put["ETag"] == f'"{hashlib.md5(b"hello").hexdigest()}"'


def test_multipart_with_part_checksums(s3: S3Sandbox) -> None:
    chunks = [os.urandom(PART), os.urandom(10)]
    uid = s3.create_multipart_upload(Bucket=s3.bucket, Key="mp", ChecksumAlgorithm="CRC32")["UploadId"]
    parts = []
    for n, body in enumerate(chunks, 1):
        r = s3.upload_part(
            Bucket=s3.bucket, Key="mp", UploadId=uid, PartNumber=n, Body=body, ChecksumAlgorithm="CRC32"
        )
        assert r["ChecksumCRC32"] == crc32_b64(body)
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    assert s3.list_multipart_uploads(Bucket=s3.bucket)["Uploads"][0]["ChecksumAlgorithm"] == "CRC32"
    # QUIRK: ListParts omits the per-part checksums.
    assert "ChecksumCRC32" not in s3.list_parts(Bucket=s3.bucket, Key="mp", UploadId=uid)["Parts"][0]
    s3.complete_multipart_upload(Bucket=s3.bucket, Key="mp", UploadId=uid, MultipartUpload={"Parts": parts})
    composite = crc32_b64(b"".join(base64.b64decode(p["ChecksumCRC32"]) for p in parts))
    # QUIRK: HeadObject gives the COMPOSITE checksum without AWS's "-2" suffix and no ChecksumType;
    # GetObjectAttributes has the type.
    head = s3.head_object(Bucket=s3.bucket, Key="mp", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"].split("-")[0] == composite
    attrs = s3.get_object_attributes(Bucket=s3.bucket, Key="mp", ObjectAttributes=["Checksum", "ObjectSize"])
    assert attrs["Checksum"] == {"ChecksumCRC32": composite, "ChecksumType": "COMPOSITE"}
    assert attrs["ObjectSize"] == PART + 10


def test_multipart_full_object_checksum(s3: S3Sandbox) -> None:
    uid = s3.create_multipart_upload(
        Bucket=s3.bucket, Key="f", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
    )["UploadId"]
    r = s3.upload_part(
        Bucket=s3.bucket, Key="f", UploadId=uid, PartNumber=1, Body=b"abc", ChecksumAlgorithm="CRC32"
    )
    s3.complete_multipart_upload(
        Bucket=s3.bucket,
        Key="f",
        UploadId=uid,
        ChecksumType="FULL_OBJECT",
        ChecksumCRC32=crc32_b64(b"abc"),
        MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]}]
        },
    )
    head = s3.head_object(Bucket=s3.bucket, Key="f", ChecksumMode="ENABLED")
    assert (head["ChecksumCRC32"], head["ChecksumType"]) == (crc32_b64(b"abc"), "FULL_OBJECT")


# -- access denied ----------------------------------------------------------------------


def test_access_denied_by_bucket_policy_without_auth_mode(s3: S3Sandbox) -> None:
    """A Deny bucket policy is enforced even with IAM auth off, but as a bare 403: the body
    is empty, so botocore's error code is "403" (message "Forbidden"), not "AccessDenied".
    moto maps the HTTP method to the action: PUT -> s3:PutObject (PutObject, UploadPart),
    POST -> s3:PostObject (CreateMultipartUpload, CompleteMultipartUpload)."""
    uid = s3.create_multipart_upload(Bucket=s3.bucket, Key="mp")["UploadId"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{s3.bucket}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=s3.bucket, Policy=json.dumps(policy))
    for call in (
        lambda: s3.put_object(Bucket=s3.bucket, Key="k", Body=b"x"),
        lambda: s3.upload_part(Bucket=s3.bucket, Key="mp", UploadId=uid, PartNumber=1, Body=b"x"),
    ):
        with pytest.raises(ClientError) as exc:
            call()
        assert (error_code(exc.value), http_status(exc.value)) == ("403", 403)
    # Not covered by s3:PutObject in moto (it is on AWS):
    s3.create_multipart_upload(Bucket=s3.bucket, Key="mp2")
    s3.delete_bucket_policy(Bucket=s3.bucket)
    s3.put_object(Bucket=s3.bucket, Key="k", Body=b"x")


def test_access_denied_with_iam_auth_mode(moto_server: MotoServer, s3: S3Sandbox) -> None:
    reader = moto_server.create_iam_user(actions=("s3:GetObject", "s3:ListBucket"))
    writer = moto_server.create_iam_user(actions=("s3:PutObject", "s3:ListBucket"))
    with moto_server.iam_auth():
        with pytest.raises(ClientError) as exc:  # the dummy "testing" key is unknown to IAM
            s3.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        assert (error_code(exc.value), http_status(exc.value)) == ("InvalidAccessKeyId", 403)

        with pytest.raises(ClientError) as exc:
            moto_server.boto3_client(**reader).put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        assert (error_code(exc.value), http_status(exc.value)) == ("AccessDenied", 403)

        bad_secret = {**writer, "aws_secret_access_key": "wrong"}
        with pytest.raises(ClientError) as exc:
            moto_server.boto3_client(**bad_secret).put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        assert (error_code(exc.value), http_status(exc.value)) == ("SignatureDoesNotMatch", 403)

        w = moto_server.boto3_client(**writer)
        w.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
        with pytest.raises(ClientError) as exc:  # CreateMultipartUpload needs s3:PutObject too
            moto_server.boto3_client(**reader).create_multipart_upload(Bucket=s3.bucket, Key="m")
        assert error_code(exc.value) == "AccessDenied"
        w.create_multipart_upload(Bucket=s3.bucket, Key="m")
    s3.put_object(Bucket=s3.bucket, Key="k2", Body=b"x")  # auth off again


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


# -- aiobotocore 3.x --------------------------------------------------------------------


def test_aiobotocore_put_multipart_kms_checksum(moto_server: MotoServer, s3: S3Sandbox) -> None:
    async def main() -> None:
        session = get_session()
        async with session.create_client("s3", **moto_server.client_kwargs()) as c:
            sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/capture"}
            put = await c.put_object(
                Bucket=s3.bucket, Key="p", Body=b"hello", ChecksumAlgorithm="SHA256", **sse
            )
            assert put["ChecksumSHA256"] == sha256_b64(b"hello") and put["SSEKMSKeyId"] == "alias/capture"
            got = await c.get_object(Bucket=s3.bucket, Key="p", ChecksumMode="ENABLED")
            async with got["Body"] as body:
                assert await body.read() == b"hello"

            chunks = [os.urandom(PART), os.urandom(PART), b"tail"]
            uid = (
                await c.create_multipart_upload(Bucket=s3.bucket, Key="mp", ChecksumAlgorithm="CRC32", **sse)
            )["UploadId"]

            async def upload(n: int, body: bytes) -> dict[str, Any]:
                r = await c.upload_part(
                    Bucket=s3.bucket,
                    Key="mp",
                    UploadId=uid,
                    PartNumber=n,
                    Body=body,
                    ChecksumAlgorithm="CRC32",
                )
                return {"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]}

            parts = await asyncio.gather(*(upload(n, b) for n, b in enumerate(chunks, 1)))
            listed = await c.list_multipart_uploads(Bucket=s3.bucket)
            assert [u["UploadId"] for u in listed["Uploads"]] == [uid]
            done = await c.complete_multipart_upload(
                Bucket=s3.bucket, Key="mp", UploadId=uid, MultipartUpload={"Parts": parts}
            )
            assert done["ETag"].endswith('-3"') and done["SSEKMSKeyId"] == "alias/capture"
            head = await c.head_object(Bucket=s3.bucket, Key="mp")
            assert head["ContentLength"] == 2 * PART + 4

            uid2 = (await c.create_multipart_upload(Bucket=s3.bucket, Key="ab"))["UploadId"]
            await c.abort_multipart_upload(Bucket=s3.bucket, Key="ab", UploadId=uid2)
            assert "Uploads" not in await c.list_multipart_uploads(Bucket=s3.bucket)
            try:
                await c.put_object(Bucket="no-such-bucket-here", Key="k", Body=b"x")
            except ClientError as exc:
                assert error_code(exc) == "NoSuchBucket"
            else:
                raise AssertionError("expected NoSuchBucket")

    asyncio.run(main())


def test_aiobotocore_through_proxy_faults(
    moto_server: MotoServer, s3: S3Sandbox, s3_proxy: FaultProxy
) -> None:
    """aiobotocore against refuse/stall. HAZARD: a stalled peer hangs a PUT forever.

    aiohttp's sock_read timer starts only once the request body is written, and botocore
    sends `Expect: 100-continue` on PutObject/UploadPart, so aiohttp waits for "100 Continue"
    with no timer at all (a large body blocked by a full send buffer hangs the same way).
    read_timeout alone does not bound an upload: wrap each call in asyncio.timeout().
    """

    async def main() -> None:
        kw = moto_server.client_kwargs(
            endpoint_url=s3_proxy.endpoint_url, connect_timeout=0.3, read_timeout=0.3
        )
        async with get_session().create_client("s3", **kw) as c:
            await c.put_object(Bucket=s3.bucket, Key="k", Body=b"x")

            s3_proxy.set_mode("refuse")
            try:
                await c.get_object(Bucket=s3.bucket, Key="k")
            except (EndpointConnectionError, ConnectionClosedError):
                pass
            else:
                raise AssertionError("expected a connection error")

            s3_proxy.set_mode("stall")
            try:
                await c.get_object(Bucket=s3.bucket, Key="k")
            except ReadTimeoutError:
                pass
            else:
                raise AssertionError("expected ReadTimeoutError")
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(1.0):
                    await c.put_object(Bucket=s3.bucket, Key="k", Body=b"x")
            except TimeoutError:
                assert time.monotonic() - t0 >= 0.9  # read_timeout=0.3 did not fire
            else:
                raise AssertionError("expected the PUT to hang")

            s3_proxy.set_mode("pass")
            await c.put_object(Bucket=s3.bucket, Key="k", Body=b"y")
            got = await c.get_object(Bucket=s3.bucket, Key="k")
            async with got["Body"] as body:
                assert await body.read() == b"y"

    asyncio.run(main())
