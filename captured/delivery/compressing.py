"""`[delivery] compression = "zstd"`: a `queue.Destination` that delivers each file compressed.

`Compressing` wraps the real destination (the `router.Router`). For a sealed spool file
`X.jsonl` under key `K.jsonl` it writes `X.jsonl.zst` beside it in the spool (`compress.
compress_file`, on a worker thread: zstd releases the GIL, so the event loop keeps taking
records), then has the inner destination store that under `K.jsonl.zst`. Keys and names are the
plain ones plus the suffix. The thread is one of its own, at a lower CPU priority (`NICE`): on a
busy host ingest gets the CPU first, and one file is compressed at a time (bounded memory;
zstd at level 3 compresses several times faster than the daemon takes records).

Crash safety and exactly-once are the plain file's: it stays in the spool, the source of truth,
until the compressed object is stored (`queue.Delivery` deletes it only then). A `.zst` left by a
crash or a failed attempt of an earlier run is deleted at start (`recovery`) and made again from
the plain file; the object key is fixed by the file name, so a second delivery overwrites
instead of duplicating. Within a run, a `.zst` whose upload failed is kept for the next attempt
(compressing again on every retry of an unreachable S3 would burn CPU for nothing).

Every result feeds `on_compressed` (the daemon's `RatioEstimate`, which lets the spool grow
plain files so that compressed objects come out near `spool.max_file_bytes`) and the counters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable

import msgspec

from captured.delivery.compress import ZST, CompressResult, compress_file
from captured.delivery.local import local_error
from captured.delivery.queue import Destination

log = logging.getLogger("captured.deliver")

#: How much lower the compressing thread's CPU priority is than the daemon's (Linux: per thread).
NICE = 10


class CompressionStats(msgspec.Struct, frozen=True):
    """What compression did (`captured status`: `compression`)."""

    level: int
    files: int
    plain_bytes: int
    compressed_bytes: int
    #: CPU seconds spent compressing (the worker thread's own time).
    cpu_s: float
    #: The ratio the spool sizes plain files by (`compress.RatioEstimate`).
    estimated_ratio: float


class Compressing:
    """A `Destination` storing `inner`'s objects as single-frame zstd, under `key + ".zst"`."""

    def __init__(
        self,
        inner: Destination,
        level: int,
        on_compressed: Callable[[CompressResult], None] = lambda result: None,
        estimate: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.level = level
        self._on_compressed = on_compressed
        self._estimate = estimate
        #: Plain files compressed in this run whose object is not stored yet: path -> .zst path.
        self._ready: dict[str, str] = {}
        self.files = self.plain_bytes = self.compressed_bytes = 0
        self.cpu_s = 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "zstd", initializer=_lower_priority)

    async def start(self) -> None:
        await self.inner.start()

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        compressed = self._ready.get(path)
        if compressed is None or not os.path.exists(compressed):
            compressed = path + ZST
            try:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, _compress, path, compressed, self.level)
            except OSError as exc:  # the spool's disk (full, failing): counted by its cause
                raise local_error(exc) from exc
            self._ready[path] = compressed
            self.files += 1
            self.plain_bytes += result.plain_bytes
            self.compressed_bytes += result.compressed_bytes
            self.cpu_s += result.cpu_s
            self._on_compressed(result)
        await self.inner.put(compressed, key + ZST, retry=retry)
        self._ready.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(compressed)  # a local destination moved it; S3 copied it

    async def tidy(self, own_prefix: str, waiting: Callable[[], set[str]]) -> None:
        """The inner destination's tidying, told the compressed keys of the files waiting."""
        await self.inner.tidy(own_prefix, lambda: {key + ZST for key in waiting()})

    async def close(self) -> None:
        await self.inner.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def statistics(self) -> CompressionStats:
        return CompressionStats(
            level=self.level,
            files=self.files,
            plain_bytes=self.plain_bytes,
            compressed_bytes=self.compressed_bytes,
            cpu_s=round(self.cpu_s, 3),
            estimated_ratio=round(self._estimate(), 3),
        )


def _lower_priority() -> None:
    """Runs in the compressing thread: lower its own priority (on Linux, nice is per thread)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICE)
    except OSError as exc:  # not permitted here: compress at the daemon's priority
        log.debug("compressing thread keeps the daemon's priority: %s", exc)


def _compress(path: str, compressed: str, level: int) -> CompressResult:
    """Compress `path` to `compressed`, replacing what an earlier failed attempt left there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(compressed)
    return compress_file(path, compressed, level)
