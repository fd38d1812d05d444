"""The S3 uploader process (`python -m captured.delivery.uploader_child`), started by the daemon.

It runs an `s3.S3Destination` per destination (one per endpoint's `DestinationS3Uri` and KMS
key, made at its first request; all share one limit on parts in flight) on an event loop of its
own, at `s3.uploader_nice`, and answers each request of `uploader.S3Uploader` over the pipe
(`uploader_pipe`). It ignores SIGINT, SIGTERM and
SIGHUP (the daemon decides when uploads stop) and exits when told to or when its stdin closes,
which is also what happens when the daemon dies: uploads in flight are cancelled, and their
multipart uploads aborted. Its fd 1 points at stderr, so nothing a library prints can garble a
reply, and its log lines join the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from captured.delivery.s3 import S3Destination, classify
from captured.delivery.uploader_pipe import (
    LEN,
    Abort,
    Cancel,
    Close,
    Done,
    Init,
    ListStale,
    Put,
    Ready,
    init_decoder,
    pack,
    read_message,
    request_decoder,
)
from captured.errors import DeliveryError
from captured.service import logs

log = logging.getLogger("captured.upload")


class _Child:
    def __init__(self, first: S3Destination, out: Any) -> None:
        self.dests = {(first.uri, first.kms_key_id): first}
        self.parts = first.parts
        self.out = out
        self.tasks: dict[int, asyncio.Task[None]] = {}

    async def dest(self, req: Put | ListStale | Abort) -> S3Destination:
        """The destination a request names (the first one's when it names none)."""
        if not req.uri:
            return next(iter(self.dests.values()))
        key = (req.uri, req.kms_key_id)
        dest = self.dests.get(key)
        if dest is None:
            first = next(iter(self.dests.values()))
            dest = S3Destination(req.uri, first.cfg, kms_key_id=req.kms_key_id, parts=self.parts)
            await dest.start()
            self.dests[key] = dest
        return dest

    async def close(self) -> None:
        for dest in self.dests.values():
            await dest.close()

    def reply(self, msg: Done) -> None:
        self.out.write(pack(msg))

    def submit(self, req: Put | ListStale | Abort) -> None:
        task = asyncio.get_running_loop().create_task(self._run(req))
        self.tasks[req.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(req.id, None))

    async def _run(self, req: Put | ListStale | Abort) -> None:
        try:
            try:
                dest = await self.dest(req)
            except Exception as exc:
                raise classify(exc) from exc
            if isinstance(req, Put):
                await dest.put(req.path, req.key, retry=req.retry)
                self.reply(Done(req.id))
            elif isinstance(req, ListStale):
                try:
                    stale = await dest.list_stale(req.own_prefix, req.older_than_s)
                except Exception as exc:
                    raise classify(exc) from exc
                self.reply(Done(req.id, uploads=stale))
            else:
                self.reply(Done(req.id, count=await dest.abort_uploads(req.uploads)))
        except DeliveryError as exc:
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
        out.write(pack(Ready(error=repr(exc))))
        await out.drain()
        return 1
    out.write(pack(Ready()))
    child = _Child(dest, out)
    try:
        while (body := await read_message(reader)) is not None:
            req = request_decoder.decode(body)
            if isinstance(req, Close):
                break
            if isinstance(req, Cancel):
                if (task := child.tasks.get(req.id)) is not None:
                    task.cancel()
                continue
            child.submit(req)
    finally:
        await child.stop()
        await child.close()
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
    head = _read_exactly(0, LEN.size)
    init = init_decoder.decode(_read_exactly(0, LEN.unpack(head)[0]))
    logs.configure(init.log_level)
    with contextlib.suppress(OSError):
        os.nice(init.s3.uploader_nice)
    import uvloop

    return uvloop.run(_child_main(init, reply_fd))


if __name__ == "__main__":
    sys.exit(main())
