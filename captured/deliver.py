"""Delivery: sealed spool files -> the destination, each exactly once, then removed locally.

The stage owns a queue of sealed files (bounded by the disk: the spool directory itself is the
durable queue) and one worker task. A `Destination` puts one file under its object key; the
local spool file is deleted only after `put` returned, so a crash at any point leaves the file
in the spool for the next start, and the next `put` of the same key overwrites instead of
duplicating (the key is fixed by the file name).

`LocalDestination` implements `file://` URIs. S3 plugs in as another `Destination`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

from . import spool

log = logging.getLogger("captured.deliver")


class Destination(Protocol):
    uri: str

    async def put(self, path: str, key: str) -> None:
        """Store the file at `path` under `key`; return only once it is durably there.

        May consume (move) `path`. Raises on failure; the caller retries later.
        """

    async def close(self) -> None: ...


def file_uri_path(uri: str) -> str:
    """The local directory of a `file:///abs/path` URI (or a plain absolute path)."""
    if uri.startswith("file://"):
        return unquote(urlsplit(uri).path)
    return uri


class LocalDestination:
    """`<root>/<key>`, appearing atomically: rename within a filesystem, else copy + rename."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = file_uri_path(uri)
        os.makedirs(self.root, exist_ok=True)

    async def put(self, path: str, key: str) -> None:
        await asyncio.to_thread(self._put, path, key)

    def _put(self, path: str, key: str) -> None:
        target = os.path.join(self.root, key)
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        try:
            os.rename(path, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # Another filesystem: a hidden temporary name that Model Monitor (which reads *.jsonl
        # only) never picks up, fsync, then an atomic rename into place.
        tmp = os.path.join(directory, f".{os.path.basename(target)}.tmp")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(tmp, target)
        os.unlink(path)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class Waiting:
    path: str
    size: int
    since: float  # wall clock when sealed (or found at start)


class Delivery:
    """Moves sealed files to `destination` in the order they were sealed."""

    RETRY_MIN_S = 0.5
    RETRY_MAX_S = 30.0

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._queue: collections.deque[Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.files_delivered = 0
        self.bytes_delivered = 0
        self.failures = 0
        self._busy = False

    def submit(self, path: str, size: int) -> None:
        self._queue.append(Waiting(path, size, time.time()))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="delivery")

    def stats(self) -> dict[str, float | int]:
        now = time.time()
        return {
            "files_delivered": self.files_delivered,
            "bytes_delivered": self.bytes_delivered,
            "failures": self.failures,
            "files_waiting": len(self._queue),
            "bytes_waiting": sum(w.size for w in self._queue),
            "oldest_waiting_s": round(now - self._queue[0].since, 3) if self._queue else 0.0,
        }

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted file is delivered (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while self._queue or self._busy:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.destination.close()

    async def _run(self) -> None:
        backoff = self.RETRY_MIN_S
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            self._busy = True
            try:
                await self.destination.put(item.path, spool.object_key(item.path))
            except Exception as exc:
                self.failures += 1
                log.warning("delivery of %s failed, retrying in %.1fs: %s", item.path, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.RETRY_MAX_S)
                continue
            finally:
                self._busy = False
            self._queue.popleft()
            backoff = self.RETRY_MIN_S
            self.files_delivered += 1
            self.bytes_delivered += item.size


def scan_spool(spool_dir: str, endpoint: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Files a previous run left: (sealed files with sizes, `.part` files), oldest first.

    Only this endpoint's files are taken; a spool shared by two daemons stays untouched.
    """
    sealed: list[tuple[float, str, int]] = []
    parts: list[str] = []
    prefix = endpoint + "."
    with os.scandir(spool_dir) as it:
        for entry in it:
            if not entry.name.startswith(prefix) or not entry.is_file():
                continue
            if entry.name.endswith(spool.SEALED):
                st = entry.stat()
                sealed.append((st.st_mtime, entry.path, st.st_size))
            elif entry.name.endswith(spool.SEALED + spool.PART):
                parts.append(entry.path)
    sealed.sort()
    return [(p, s) for _, p, s in sealed], sorted(parts)
