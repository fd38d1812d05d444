"""The daemon's side of the S3 uploader process: uploads never compete with ingest for the loop.

Moving a file to S3 is byte work (read, checksum, socket writes) plus botocore's per-request
Python. Run on the daemon's event loop, it took the loop from ingest: with large files going up
while clients sent at full speed, the daemon took far fewer records per second (bench/README.md).
So `S3Uploader`, the `queue.Destination` the daemon uses for `s3://`, starts
`python -m captured.delivery.uploader_child` and hands it one file at a time over a pipe
(`uploader_pipe`); the child runs `s3.S3Destination` on an event loop of its own, at
`s3.uploader_nice` (lower CPU priority), and answers with the outcome. Queueing, retries,
counters and deleting the local file stay in the daemon (`queue.Delivery`); the child keeps no
state but its open uploads. A child that dies fails the uploads in flight as retryable
(`uploader_exited`); the next upload starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from captured.delivery.uploader_pipe import (
    Abort,
    Cancel,
    Close,
    Done,
    Init,
    ListStale,
    Put,
    Ready,
    pack,
    read_message,
    reply_decoder,
)
from captured.errors import DeliveryError, UploadError
from captured.service.settings import S3Config

log = logging.getLogger("captured.upload")

#: A child slower than this to import aiobotocore and open its client is taken as broken.
START_TIMEOUT_S = 60.0
#: The start-up look for uploads an earlier run left open gives up after this long.
TIDY_TIMEOUT_S = 120.0
#: After Close, how long the child gets to abort what is in flight and exit before it is killed.
CLOSE_TIMEOUT_S = 20.0


class S3Uploader:
    """A `queue.Destination` for `s3://bucket[/prefix]` whose uploads run in a child process."""

    def __init__(self, uri: str, cfg: S3Config, *, kms_key_id: str | None = None) -> None:
        self.uri = uri
        self.cfg = cfg
        self.kms_key_id = kms_key_id
        self._proc: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Done]] = {}
        self._next_id = 0
        self._starting: asyncio.Lock | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None and self._reader_task is not None:
                return self._proc
            return await self._spawn()

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "captured.delivery.uploader_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        level = logging.getLevelName(logging.getLogger("captured").getEffectiveLevel())
        proc.stdin.write(pack(Init(self.uri, self.cfg, self.kms_key_id, str(level))))
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await proc.stdin.drain()
                body = await read_message(proc.stdout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            await _kill(proc)
            raise OSError(f"the S3 uploader process did not start: {exc!r}") from exc
        reply = reply_decoder.decode(body) if body is not None else Ready("it exited at once")
        if not isinstance(reply, Ready) or reply.error is not None:
            await _kill(proc)
            raise OSError(f"the S3 uploader process did not start: {getattr(reply, 'error', reply)}")
        self._proc = proc
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_replies(proc), name="uploader-replies"
        )
        self.starts += 1
        if self.starts > 1:
            log.info("S3 uploader process restarted (pid %d)", proc.pid)
        return proc

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while (body := await read_message(proc.stdout)) is not None:
                reply = reply_decoder.decode(body)
                if isinstance(reply, Done) and (fut := self._pending.pop(reply.id, None)) and not fut.done():
                    fut.set_result(reply)
        except Exception as exc:  # a broken stream, or a bug here: never leave puts waiting forever
            log.error("S3 uploader process: broken reply stream (%r); stopping it", exc, exc_info=exc)
            proc.kill()
        rc = await proc.wait()
        if self._reader_task is asyncio.current_task():
            self._reader_task = None
        pending, self._pending = self._pending, {}
        if pending:
            log.warning(
                "S3 uploader process exited (status %s) with %d upload(s) in flight", rc, len(pending)
            )
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(
                    UploadError(
                        cause="uploader_exited",
                        retryable=True,
                        message=f"the S3 uploader process exited (status {rc})",
                    )
                )

    async def _request(self, make: Any) -> Done:
        proc = await self._ensure()
        assert proc.stdin is not None
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            proc.stdin.write(pack(make(rid)))
            await proc.stdin.drain()
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None and proc.returncode is None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(pack(Cancel(rid)))
            raise
        except (OSError, RuntimeError) as exc:  # the pipe broke: the child is gone
            self._pending.pop(rid, None)
            raise UploadError(
                cause="uploader_exited", retryable=True, message=f"the S3 uploader process is gone: {exc}"
            ) from exc

    def target(self, uri: str, kms_key_id: str | None) -> S3Target:
        """A `queue.Destination` for another `s3://` destination, uploaded by this same process."""
        return S3Target(self, uri, kms_key_id)

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        uri, kms = self.uri, self.kms_key_id
        done = await self._request(lambda rid: Put(rid, path, key, retry, uri, kms))
        if (err := done.error()) is not None:
            raise err

    async def list_stale(self, own_prefix: str, older_than_s: float) -> list[tuple[str, str]]:
        uri, kms = self.uri, self.kms_key_id
        done = await self._request(lambda rid: ListStale(rid, own_prefix, older_than_s, uri, kms))
        if (err := done.error()) is not None:
            raise err
        return [tuple(u) for u in done.uploads]  # type: ignore[misc]

    async def abort_uploads(self, uploads: list[tuple[str, str]]) -> int:
        uri, kms = self.uri, self.kms_key_id
        done = await self._request(lambda rid: Abort(rid, list(uploads), uri, kms))
        if (err := done.error()) is not None:
            raise err
        return done.count

    async def tidy(self, own_prefix: str, waiting: Callable[[], set[str]]) -> None:
        """Abort the multipart uploads of capture files an earlier run left open under
        `own_prefix` that no waiting file explains and that are older than
        `s3.abort_unknown_uploads_after_s` (younger ones may be another host's, in flight)."""
        try:
            async with asyncio.timeout(TIDY_TIMEOUT_S):
                stale = await self.list_stale(own_prefix, self.cfg.abort_unknown_uploads_after_s)
                # Listed before `waiting()` is asked: a file of this run whose upload is open is
                # still waiting then, and one delivered since has no open upload left to abort.
                explained = waiting()
                unknown = [(key, upload_id) for key, upload_id in stale if key not in explained]
                aborted = await self.abort_uploads(unknown) if unknown else 0
        except (DeliveryError, TimeoutError) as exc:  # S3 unreachable now: the next start looks again
            log.warning("could not look for multipart uploads left open under %s: %s", own_prefix, exc)
            return
        if aborted:
            log.info(
                "aborted %d multipart upload(s) under %s left open by an earlier run, that no spool"
                " file explains",
                aborted,
                own_prefix,
            )

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(pack(Close()))
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.warning("S3 uploader process did not exit in %.0f s; killing it", CLOSE_TIMEOUT_S)
                await _kill(proc)
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None


class S3Target(S3Uploader):
    """Another destination of an `S3Uploader`: its requests go to the same process; closing it
    closes nothing (the uploader it belongs to owns the process)."""

    def __init__(self, uploader: S3Uploader, uri: str, kms_key_id: str | None) -> None:
        self.uploader = uploader
        self.uri = uri
        self.kms_key_id = kms_key_id
        self.cfg = uploader.cfg

    @property
    def pid(self) -> int | None:
        return self.uploader.pid

    async def start(self) -> None:
        await self.uploader.start()

    async def _request(self, make: Any) -> Done:
        return await self.uploader._request(make)

    async def close(self) -> None:
        return None


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
