"""Sealed spool files -> S3 with aiobotocore: PutObject or parallel multipart, SSE-KMS, checksums.

Object keys follow SageMaker's layout::

    {prefix}/{endpoint}/{variant}/yyyy/mm/dd/hh/MM-SS-mmm-{uuid4}.jsonl

The key is fixed by the sealed file's name, so a retry, or a restart after a crash, writes the
same key again instead of adding a duplicate. A file below `multipart_threshold_bytes` goes up
with one PutObject; a larger one as a multipart upload whose parts (planned by `plan_parts`, S3's
rules: 5 MiB <= part <= 5 GiB, at most 10,000 parts) upload in parallel, bounded across all uploads
by `max_concurrent_parts`.

No multipart upload is left open (their parts are billed until someone aborts them):

* the upload is aborted as soon as anything fails or the upload is cancelled; an abort that fails
  (S3 unreachable) is tried again in the background, with backoff, until S3 answers;
* a CreateMultipartUpload whose response was lost and that botocore sent again made an upload
  nobody was told of: after such an upload completes, the key's other open uploads are aborted;
* an attempt that may follow an earlier one (a retry, a file left by an earlier run) first aborts
  every open upload of its key (`put(..., retry=True)`);
* at start, the daemon looks for capture-file uploads under its own `{endpoint}/` prefix that no
  spool file explains and that are older than `s3.abort_unknown_uploads_after_s` (younger ones
  may be another host's, in flight to the same prefix), and aborts them (`list_stale`,
  `abort_uploads`).

The key of every capture file is unique (a uuid4 in its name), so aborting a key's other uploads
never touches another file's, nor another host's.

Bodies stream from the file (`s3body.FilePart`), a piece at a time, never a whole part in memory.
Every PutObject and UploadPart carries the CRC32 of its body, computed beforehand in a worker
thread, which the server verifies; the payload itself is not signed (the checksum covers it, as
botocore does by default over HTTPS). SSE-KMS headers go with every object when `KmsKeyId`
is set. Failures are classified by `classify`: retryable ones (network,
timeouts, throttling, 5xx) and fatal ones (access denied, no such bucket, bad KMS key); the
delivery stage decides how soon to try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from captured.errors import UploadError
from captured.service.settings import S3Config

log = logging.getLogger("captured.upload")

MIB = 1024 * 1024
MIN_PART_BYTES = 5 * MIB
MAX_PART_BYTES = 5 * 1024 * MIB
MAX_PARTS = 10_000
#: A failed AbortMultipartUpload is tried again after this long, doubling up to the cap.
ABORT_RETRY_MIN_S = 1.0
ABORT_RETRY_MAX_S = 60.0
#: The relative key of a capture file: {endpoint}/{variant}/yyyy/mm/dd/hh/MM-SS-mmm-{uuid}.jsonl
CAPTURE_KEY = re.compile(
    r"[^/]+/[^/]+/\d{4}/\d{2}/\d{2}/\d{2}/\d{2}-\d{2}-\d{3}-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\.jsonl(\.zst)?"
)

# Error codes that no retry will mend until someone changes something (permissions, bucket, key).
_FATAL_CODES = {
    "AccessDenied": "access_denied",
    "AllAccessDisabled": "access_denied",
    "AccountProblem": "access_denied",
    "InvalidAccessKeyId": "bad_credentials",
    "SignatureDoesNotMatch": "bad_credentials",
    "ExpiredToken": "bad_credentials",
    "InvalidToken": "bad_credentials",
    "NoSuchBucket": "no_such_bucket",
    "KMS.NotFoundException": "kms_key",
    "KMS.DisabledException": "kms_key",
    "KMS.KMSInvalidStateException": "kms_key",
    "KMSAccessDenied": "kms_key",
    "InvalidArgument": "invalid_request",
    "InvalidRequest": "invalid_request",
}
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "BadDigest",  # the body was damaged in transit: send it again
    "NoSuchUpload",  # our multipart upload vanished (aborted elsewhere): start over
}


def classify(exc: BaseException) -> UploadError:
    """Map anything an upload can raise to an `UploadError` (retryable or fatal, and why)."""
    if isinstance(exc, UploadError):
        return exc
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{code or status}: {err.get('Message', exc)}"
        if code in _FATAL_CODES:
            return UploadError(cause=_FATAL_CODES[code], retryable=False, message=message)
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return UploadError(
                cause="throttled" if status in (429, 503) else "server_error", retryable=True, message=message
            )
        if status == 403:
            return UploadError(cause="access_denied", retryable=False, message=message)
        if status == 404:
            return UploadError(cause="no_such_bucket", retryable=False, message=message)
        return UploadError(cause=f"client_error_{status or 'unknown'}", retryable=False, message=message)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return UploadError(cause="no_credentials", retryable=False, message=str(exc))
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectTimeoutError | asyncio.TimeoutError | TimeoutError):
        return UploadError(cause="timeout", retryable=True, message=str(exc) or type(exc).__name__)
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.HTTPClientError | OSError):
        return UploadError(cause="connection", retryable=True, message=str(exc) or type(exc).__name__)
    if isinstance(exc, bx.BotoCoreError):
        return UploadError(cause="client_error", retryable=True, message=str(exc))
    return UploadError(cause="unexpected", retryable=True, message=f"{type(exc).__name__}: {exc}")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"): no leading or trailing "/"."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def s3_key(prefix: str, relative_key: str) -> str:
    """The object key: never a leading "/", never "//" (a trailing "/" on the URI is dropped)."""
    return f"{prefix}/{relative_key}" if prefix else relative_key


def plan_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part of a `size`-byte multipart upload.

    The part size is raised (to whole MiB) when `size` would need more than 10,000 parts, and kept
    within S3's 5 MiB..5 GiB; every part but the last has the same size.
    """
    if size <= 0:
        raise ValueError("a multipart upload needs at least one byte")
    part = max(MIN_PART_BYTES, min(part_size, MAX_PART_BYTES))
    if -(-size // part) > MAX_PARTS:
        part = -(-size // MAX_PARTS)
        part = -(-part // MIB) * MIB
    if part > MAX_PART_BYTES:
        raise ValueError(f"{size} bytes exceed what 10,000 parts of at most 5 GiB can hold")
    return [(off, min(part, size - off)) for off in range(0, size, part)]


class S3Destination:
    """A `queue.Destination` for `s3://bucket[/prefix]`."""

    def __init__(
        self,
        uri: str,
        cfg: S3Config,
        *,
        kms_key_id: str | None = None,
        parts: asyncio.Semaphore | None = None,
    ) -> None:
        self.uri = uri
        self.bucket, self.prefix = split_s3_uri(uri)
        self.cfg = cfg
        self.kms_key_id = kms_key_id
        #: Parts in flight (`s3.max_concurrent_parts`); destinations in one process share it.
        self.parts = parts if parts is not None else asyncio.Semaphore(cfg.max_concurrent_parts)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        #: Open uploads whose abort failed: upload id -> key; retried by `_retry_aborts`.
        self.unaborted: dict[str, str] = {}
        self._abort_retry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            max_pool_connections=self.cfg.max_concurrent_parts + self.cfg.max_concurrent_uploads,
            connect_timeout=10,
            read_timeout=60,
            # A few quick retries inside botocore; the delivery stage retries without limit.
            retries={"mode": "standard", "total_max_attempts": 3},
            request_checksum_calculation="when_supported",
            # The body is covered by its CRC32 checksum, which S3 verifies; signing it as well
            # means a SHA-256 pass over every byte on the event loop. Over HTTPS with a checksum
            # botocore already leaves the payload unsigned; this does the same on any endpoint.
            s3={"payload_signing_enabled": False},
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region, config=config
            )
        )

    async def close(self) -> None:
        if self._abort_retry is not None:
            self._abort_retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._abort_retry
            self._abort_retry = None
        if self.unaborted and self._client is not None:  # one last try before the client goes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self._abort_unaborted()
        if self.unaborted:
            log.warning(
                "%d multipart upload(s) could not be aborted (their files stay in the spool, or the"
                " next start's clean-up or the bucket's lifecycle rule removes them): %s",
                len(self.unaborted),
                ", ".join(sorted(set(self.unaborted.values()))),
            )
        await self._stack.aclose()
        self._client = None

    async def _call(self, coro: Any) -> Any:
        # aiobotocore's read_timeout does not cover a request whose body is stuck behind a
        # stalled connection (botocore sends `Expect: 100-continue` and aiohttp starts its read
        # timer only after the body is written): without this bound, such an upload hangs forever.
        async with asyncio.timeout(self.cfg.request_timeout_s):
            return await coro

    def key_for(self, relative_key: str) -> str:
        return s3_key(self.prefix, relative_key)

    def _sse(self) -> dict[str, str]:
        if self.kms_key_id is None:
            return {}
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        """Upload `path` as `key` (relative: the prefix is added here). Raises `UploadError`.

        `retry`: an earlier attempt at this key may have left a multipart upload open; abort
        every open upload of the key first.
        """
        try:
            size = os.stat(path).st_size
            full_key = self.key_for(key)
            if retry:
                await self.abort_open(full_key)
            if size < self.cfg.multipart_threshold_bytes:
                await self._put_object(path, full_key, size)
            else:
                await self._multipart(path, full_key, size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    async def _put_object(self, path: str, key: str, size: int) -> None:
        from captured.delivery.s3body import FilePart, crc32_of

        crc32 = await asyncio.to_thread(crc32_of, path, 0, size)
        body = FilePart(path, 0, size)
        await self._call(
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=crc32,
                **self._sse(),
            )
        )

    async def _multipart(self, path: str, key: str, size: int) -> None:
        created = await self._call(
            self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32", **self._sse()
            )
        )
        upload_id = created["UploadId"]
        # Sent more than once (a response lost on the way back): S3 may hold uploads for this
        # key that nobody was told of. They are aborted once this one is complete.
        resent = created.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
        try:  # acquire, then register the cleanup: any failure or cancellation aborts the upload
            parts = await asyncio.gather(
                *(
                    self._part(path, key, upload_id, number, offset, length)
                    for number, (offset, length) in enumerate(plan_parts(size, self.cfg.part_size_bytes), 1)
                )
            )
            await self._call(
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            )
        except BaseException:
            await asyncio.shield(self._abort(key, upload_id))
            raise
        if resent:
            # A failure here fails the put: the file stays and its retry aborts them first.
            await self.abort_open(key)

    async def _part(
        self, path: str, key: str, upload_id: str, number: int, offset: int, length: int
    ) -> dict[str, Any]:
        from captured.delivery.s3body import FilePart, crc32_of

        async with self.parts:
            crc32 = await asyncio.to_thread(crc32_of, path, offset, length)
            body = FilePart(path, offset, length)
            resp = await self._call(
                self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumAlgorithm="CRC32",
                    ChecksumCRC32=crc32,
                )
            )
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if "ChecksumCRC32" in resp:
            part["ChecksumCRC32"] = resp["ChecksumCRC32"]
        return part

    async def _abort(self, key: str, upload_id: str) -> bool:
        """Abort one upload (gone already counts as done); on failure, keep it for a retry."""
        try:
            await self._call_abort(key, upload_id)
        except Exception as exc:
            if upload_id not in self.unaborted:
                log.warning("could not abort multipart upload of %s (will try again): %s", key, exc)
            self.unaborted[upload_id] = key
            if self._abort_retry is None or self._abort_retry.done():
                self._abort_retry = asyncio.get_running_loop().create_task(
                    self._retry_aborts(), name="abort-retry"
                )
            return False
        if self.unaborted.pop(upload_id, None) is not None:
            log.info("aborted multipart upload of %s on a later try", key)
        return True

    async def _call_abort(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            async with asyncio.timeout(10):
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise

    async def _abort_unaborted(self) -> None:
        for upload_id, key in list(self.unaborted.items()):
            if upload_id in self.unaborted:
                await self._abort(key, upload_id)

    async def _retry_aborts(self) -> None:
        delay = ABORT_RETRY_MIN_S
        while self.unaborted:
            await asyncio.sleep(delay)
            await self._abort_unaborted()
            delay = min(delay * 2, ABORT_RETRY_MAX_S)

    async def abort_open(self, key: str) -> int:
        """Abort every open multipart upload of `key` (a full key). Raises if S3 cannot say."""
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        async with asyncio.timeout(self.cfg.request_timeout_s):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                for upload in page.get("Uploads", []):
                    if upload["Key"] == key and await self._abort(key, upload["UploadId"]):
                        aborted += 1
        if key in self.unaborted.values():
            raise UploadError(
                cause="abort_failed",
                retryable=True,
                message=f"an open multipart upload of {key} could not be aborted",
            )
        if aborted:
            log.info("aborted %d multipart upload(s) of %s left open by an earlier attempt", aborted, key)
        return aborted

    async def list_stale(self, own_prefix: str, older_than_s: float) -> list[tuple[str, str]]:
        """Open uploads of capture files under the relative `own_prefix` (the daemon's
        `{endpoint}/`) that S3 says were initiated more than `older_than_s` ago, as
        (relative key, upload id)."""
        full_prefix = self.key_for(own_prefix)
        strip = len(self.key_for(""))
        cutoff = datetime.datetime.fromtimestamp(time.time() - older_than_s, datetime.UTC)
        stale = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for upload in page.get("Uploads", []):
                key, initiated = upload["Key"], upload.get("Initiated")
                if not key.startswith(full_prefix) or not CAPTURE_KEY.fullmatch(key[strip:]):
                    continue  # not a capture file: someone else's upload
                if isinstance(initiated, datetime.datetime) and initiated <= cutoff:
                    stale.append((key[strip:], upload["UploadId"]))
        return stale

    async def abort_uploads(self, uploads: Sequence[tuple[str, str]]) -> int:
        """Abort these (relative key, upload id); return how many are gone (failures retry)."""
        aborted = 0
        for key, upload_id in uploads:
            if await self._abort(self.key_for(key), upload_id):
                aborted += 1
        return aborted
