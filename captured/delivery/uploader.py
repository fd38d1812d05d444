"""The S3 uploader as a child process: uploads never compete with ingest for the GIL or the loop.

Moving a file to S3 is byte work (read, checksum, socket writes) plus botocore's per-request
Python. Run on the daemon's event loop, it took the loop from ingest: with 64 MiB files going up
while clients sent at full speed, the daemon took half as many records per second (bench/README.md).
So `S3Uploader`, the `deliver.Destination` the daemon uses for `s3://`, starts
`python -m captured.delivery.uploader` and hands it one file at a time over a pipe; the child runs
`upload.S3Destination` on an event loop of its own, at `s3.uploader_nice` (lower CPU priority),
and answers with the outcome. Queueing, retries, counters and deleting the local file stay in the
daemon (`deliver.Delivery`); the child keeps no state but its open uploads.

Messages are MessagePack with a 4-byte big-endian length, on the child's stdin (requests) and on
its original stdout (replies); the child points its fd 1 at stderr, so nothing a library prints
can garble a reply, and its log lines join the daemon's. The child ignores SIGINT, SIGTERM and
SIGHUP (a terminal's Ctrl-C or systemd's stop signal reaches every process of the group; the
daemon decides when uploads stop) and exits when told to or when its stdin closes, which is also
what happens when the daemon dies: uploads in flight are cancelled, and their multipart uploads
aborted. A child that dies fails the uploads in flight as retryable (`uploader_exited`); the next
upload starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
from typing import Any

import msgspec

from captured.delivery.s3 import S3Destination, UploadError, classify
from captured.service import logs
from captured.service.config import S3Config

log = logging.getLogger("captured.upload")

_LEN = struct.Struct(">I")
#: A child slower than this to import aiobotocore and open its client is taken as broken.
START_TIMEOUT_S = 60.0
#: After Close, how long the child gets to abort what is in flight and exit before it is killed.
CLOSE_TIMEOUT_S = 20.0


class Init(msgspec.Struct, tag=True):
    uri: str
    s3: S3Config
    kms_key_id: str | None
    log_level: str


class Ready(msgspec.Struct, tag=True):
    error: str | None = None


class Put(msgspec.Struct, tag=True):
    id: int
    path: str
    key: str
    retry: bool = False


class Cancel(msgspec.Struct, tag=True):
    id: int


class ListStale(msgspec.Struct, tag=True):
    id: int
    own_prefix: str
    older_than_s: float


class Abort(msgspec.Struct, tag=True):
    id: int
    uploads: list[tuple[str, str]]


class Close(msgspec.Struct, tag=True):
    pass


class Done(msgspec.Struct, tag=True):
    id: int
    count: int = 0
    uploads: list[tuple[str, str]] = []
    #: Set when the request failed: `UploadError`'s cause and retryable flag, and the message.
    cause: str | None = None
    retryable: bool = True
    message: str = ""


Request = Put | Cancel | ListStale | Abort | Close
Reply = Ready | Done

_encoder = msgspec.msgpack.Encoder()
_init_decoder = msgspec.msgpack.Decoder(Init)
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def _pack(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One message's body, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return await reader.readexactly(_LEN.unpack(head)[0])


# -- the daemon's side ----------------------------------------------------------------------


class S3Uploader:
    """A `deliver.Destination` for `s3://bucket[/prefix]` whose uploads run in a child process."""

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
            "captured.delivery.uploader",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        level = logging.getLevelName(logging.getLogger("captured").getEffectiveLevel())
        proc.stdin.write(_pack(Init(self.uri, self.cfg, self.kms_key_id, str(level))))
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await proc.stdin.drain()
                body = await _read_message(proc.stdout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            await _kill(proc)
            raise OSError(f"the S3 uploader process did not start: {exc!r}") from exc
        reply = _reply_decoder.decode(body) if body is not None else Ready("it exited at once")
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
            while (body := await _read_message(proc.stdout)) is not None:
                reply = _reply_decoder.decode(body)
                if isinstance(reply, Done) and (fut := self._pending.pop(reply.id, None)) and not fut.done():
                    fut.set_result(reply)
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            log.error("S3 uploader process: broken reply stream (%r); stopping it", exc)
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
                    UploadError("uploader_exited", True, f"the S3 uploader process exited (status {rc})")
                )

    async def _request(self, make: Any) -> Done:
        proc = await self._ensure()
        assert proc.stdin is not None
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            proc.stdin.write(_pack(make(rid)))
            await proc.stdin.drain()
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None and proc.returncode is None:
                with contextlib.suppress(OSError, RuntimeError):
                    proc.stdin.write(_pack(Cancel(rid)))
            raise
        except (OSError, RuntimeError) as exc:  # the pipe broke: the child is gone
            self._pending.pop(rid, None)
            raise UploadError("uploader_exited", True, f"the S3 uploader process is gone: {exc}") from exc

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        done = await self._request(lambda rid: Put(rid, path, key, retry))
        if done.cause is not None:
            raise UploadError(done.cause, done.retryable, done.message)

    async def list_stale(self, own_prefix: str, older_than_s: float) -> list[tuple[str, str]]:
        done = await self._request(lambda rid: ListStale(rid, own_prefix, older_than_s))
        if done.cause is not None:
            raise UploadError(done.cause, done.retryable, done.message)
        return [tuple(u) for u in done.uploads]  # type: ignore[misc]

    async def abort_uploads(self, uploads: list[tuple[str, str]]) -> int:
        done = await self._request(lambda rid: Abort(rid, list(uploads)))
        if done.cause is not None:
            raise UploadError(done.cause, done.retryable, done.message)
        return done.count

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(_pack(Close()))
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


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# -- the child's side -----------------------------------------------------------------------


class _Child:
    def __init__(self, dest: S3Destination, out: Any) -> None:
        self.dest = dest
        self.out = out
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def reply(self, msg: Done) -> None:
        self.out.write(_pack(msg))

    def submit(self, req: Put | ListStale | Abort) -> None:
        task = asyncio.get_running_loop().create_task(self._run(req))
        self.tasks[req.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(req.id, None))

    async def _run(self, req: Put | ListStale | Abort) -> None:
        try:
            if isinstance(req, Put):
                await self.dest.put(req.path, req.key, retry=req.retry)
                self.reply(Done(req.id))
            elif isinstance(req, ListStale):
                try:
                    stale = await self.dest.list_stale(req.own_prefix, req.older_than_s)
                except Exception as exc:
                    raise classify(exc) from exc
                self.reply(Done(req.id, uploads=stale))
            else:
                self.reply(Done(req.id, count=await self.dest.abort_uploads(req.uploads)))
        except UploadError as exc:
            self.reply(Done(req.id, cause=exc.cause, retryable=exc.retryable, message=str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug, not S3: say so, and let the daemon retry slowly
            log.exception("S3 uploader: request %d failed unexpectedly", req.id)
            self.reply(Done(req.id, cause="internal", retryable=False, message=repr(exc)))

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _child_main(init: Init, reply_fd: int) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
    )
    w_transport, w_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(reply_fd, "wb", buffering=0)
    )
    out = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
    dest = S3Destination(init.uri, init.s3, kms_key_id=init.kms_key_id)
    try:
        await dest.start()
    except Exception as exc:
        out.write(_pack(Ready(error=repr(exc))))
        await out.drain()
        return 1
    out.write(_pack(Ready()))
    child = _Child(dest, out)
    try:
        while (body := await _read_message(reader)) is not None:
            req = _request_decoder.decode(body)
            if isinstance(req, Close):
                break
            if isinstance(req, Cancel):
                if (task := child.tasks.get(req.id)) is not None:
                    task.cancel()
                continue
            child.submit(req)
    finally:
        await child.stop()
        await dest.close()
        with contextlib.suppress(OSError):
            await out.drain()
    return 0


def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise SystemExit(1)  # the daemon went away before saying what to do
        data += chunk
    return data


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints go to the log, not into the reply stream
    head = _read_exactly(0, _LEN.size)
    init = _init_decoder.decode(_read_exactly(0, _LEN.unpack(head)[0]))
    logs.configure(init.log_level)
    with contextlib.suppress(OSError):
        os.nice(init.s3.uploader_nice)
    import uvloop

    return uvloop.run(_child_main(init, reply_fd))


if __name__ == "__main__":
    sys.exit(main())
