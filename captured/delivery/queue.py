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
import random
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any, Protocol

from captured.daemon import spool

log = logging.getLogger("captured.deliver")


class Destination(Protocol):
    uri: str

    async def start(self) -> None: ...

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        """Store the file at `path` under the relative `key`; return once it is durably there.

        May consume (move) `path`; the caller removes it otherwise. Raises on failure (an
        exception with `retryable` and `cause` attributes says how soon to try again). `retry`:
        an earlier attempt at this key (this run's or an earlier run's) may have left something
        behind to clean up first.
        """

    async def close(self) -> None: ...


def file_uri_path(uri: str) -> str:
    """The local directory of a `file:///abs/path` destination (or a plain absolute path).

    The configuration stores `file://` followed by the path as written, not percent-encoded,
    so a directory named `out%41#1` stays `out%41#1`.
    """
    return uri[len("file://") :] if uri.startswith("file://") else uri


#: Causes of a failed local delivery by errno; any other is named after its errno (`eio`, ...).
LOCAL_CAUSES = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "quota_exceeded",
    errno.EACCES: "access_denied",
    errno.EPERM: "access_denied",
    errno.EROFS: "read_only_filesystem",
}
#: Causes a retry soon will not mend: tried again every `Delivery.FATAL_RETRY_S`.
LOCAL_FATAL = frozenset({"access_denied", "read_only_filesystem"})


class LocalDeliveryError(OSError):
    """A `file://` delivery failed; `cause` names why (counted and logged under it)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(exc.errno, exc.strerror, exc.filename)
        code = exc.errno or 0
        self.cause = LOCAL_CAUSES.get(code) or errno.errorcode.get(code, "os_error").lower()
        self.retryable = self.cause not in LOCAL_FATAL


class LocalDestination:
    """`<root>/<key>`, appearing atomically: rename within a filesystem, else copy + rename."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = file_uri_path(uri)
        os.makedirs(self.root, exist_ok=True)

    async def start(self) -> None:
        return None

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        try:
            await asyncio.to_thread(self._put, path, key)
        except OSError as exc:
            raise LocalDeliveryError(exc) from exc

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
        src_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            with open(src_fd, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk keeps no half copy (it would hold the space)
            raise
        os.rename(tmp, target)
        os.unlink(path)

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class Waiting:
    path: str
    size: int
    since: float  # wall clock when sealed (or found at start)
    not_before: float = 0.0  # monotonic: no attempt before this (backoff after a failure)
    attempts: int = 0
    recovered: bool = False  # left by an earlier run, which may have begun uploading it


class Delivery:
    """Moves sealed files to `destination`, `workers` at a time, oldest first.

    A failed file stays queued (and in the spool) and is tried again: retryable failures after a
    capped, jittered exponential backoff without any limit in time; fatal ones (access denied, no
    such bucket, ...) every `FATAL_RETRY_S`, so a fixed permission resumes delivery without a
    restart. Each cause is logged once until delivery succeeds again.
    """

    RETRY_MIN_S = 0.5
    RETRY_MAX_S = 30.0
    FATAL_RETRY_S = 60.0
    REPORT_EVERY_S = 60.0

    def __init__(
        self, destination: Destination, *, workers: int = 1, fatal_retry_s: float | None = None
    ) -> None:
        self.destination = destination
        if fatal_retry_s is not None:
            self.FATAL_RETRY_S = fatal_retry_s
        self.workers = workers
        self._queue: collections.deque[Waiting] = collections.deque()
        self._in_flight: list[Waiting] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.files_delivered = 0
        self.bytes_delivered = 0
        self.retries = 0
        self.failures: dict[str, int] = {}
        self._logged_causes: set[str] = set()
        self._rng = random.Random()

    def submit(self, path: str, size: int, *, recovered: bool = False) -> None:
        self._queue.append(Waiting(path, size, time.time(), recovered=recovered))
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"delivery-{i}") for i in range(self.workers)]
        self._tasks.append(loop.create_task(self._report(), name="delivery-report"))

    def stats(self) -> dict[str, Any]:
        waiting = [*self._queue, *self._in_flight]
        now = time.time()
        return {
            "files_delivered": self.files_delivered,
            "bytes_delivered": self.bytes_delivered,
            "retries": self.retries,
            "failures": dict(self.failures),
            "files_waiting": len(waiting),
            "bytes_waiting": sum(w.size for w in waiting),
            "oldest_waiting_s": round(now - min(w.since for w in waiting), 3) if waiting else 0.0,
        }

    def waiting_paths(self) -> list[str]:
        return [w.path for w in (*self._queue, *self._in_flight)]

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted file is delivered (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while self._queue or self._in_flight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Cancel the workers (an upload in flight is aborted, its file stays), close the client."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.destination.close()

    def _next(self) -> Waiting | float:
        """The oldest file due for an attempt, or how long until one is due."""
        now = time.monotonic()
        soonest = self.RETRY_MAX_S
        for item in self._queue:
            if item.not_before <= now:
                self._queue.remove(item)
                return item
            soonest = min(soonest, item.not_before - now)
        return soonest

    async def _worker(self) -> None:
        while True:
            item = self._next()
            if isinstance(item, float):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), item if self._queue else None)
                continue
            self._in_flight.append(item)
            try:
                await self._deliver(item)
            finally:
                self._in_flight.remove(item)

    async def _deliver(self, item: Waiting) -> None:
        if not os.path.exists(item.path):  # removed from the spool by hand: nothing to deliver
            self.failures["file_missing"] = self.failures.get("file_missing", 0) + 1
            log.warning("%s vanished from the spool before delivery; dropping it from the queue", item.path)
            return
        try:
            retry = item.attempts > 0 or item.recovered
            await self.destination.put(item.path, spool.object_key(item.path), retry=retry)
        except asyncio.CancelledError:
            self._queue.appendleft(item)
            raise
        except Exception as exc:
            self._failed(item, exc)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(item.path)  # only now: the destination confirmed the object
        self.files_delivered += 1
        self.bytes_delivered += item.size
        self._logged_causes.clear()  # delivery works again: report the next failure anew

    def _failed(self, item: Waiting, exc: Exception) -> None:
        retryable = getattr(exc, "retryable", True)
        cause = getattr(exc, "cause", type(exc).__name__)
        self.failures[cause] = self.failures.get(cause, 0) + 1
        self.retries += 1
        item.attempts += 1
        if retryable:
            cap = min(self.RETRY_MIN_S * 2 ** min(item.attempts - 1, 16), self.RETRY_MAX_S)
            delay = self._rng.uniform(cap / 2, cap)  # jitter: many files do not retry in lockstep
        else:
            delay = self.FATAL_RETRY_S
        item.not_before = time.monotonic() + delay
        self._queue.append(item)
        self._wake.set()
        if cause not in self._logged_causes:
            self._logged_causes.add(cause)
            when = (
                f"retrying with backoff (up to {self.RETRY_MAX_S:.0f}s apart)"
                if retryable
                else f"retrying every {self.FATAL_RETRY_S:.0f}s until the cause is fixed"
            )
            log.warning("delivery of %s failed (%s), %s: %s", spool.object_key(item.path), cause, when, exc)

    async def _report(self) -> None:
        """A periodic line while there is something to say: what moved, what waits, what fails."""
        last = (0, 0, 0)
        while True:
            await asyncio.sleep(self.REPORT_EVERY_S)
            now = (self.files_delivered, self.retries, len(self._queue) + len(self._in_flight))
            if now != last and now != (last[0], last[1], 0):
                st = self.stats()
                log.info(
                    "delivery: %d files (%d bytes) delivered, %d retries, failures %s; %d files (%d bytes)"
                    " waiting, oldest %.0fs",
                    st["files_delivered"],
                    st["bytes_delivered"],
                    st["retries"],
                    st["failures"] or "none",
                    st["files_waiting"],
                    st["bytes_waiting"],
                    st["oldest_waiting_s"],
                )
            last = now


def scan_spool(spool_dir: str, endpoint: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Files a previous run left: (sealed files with sizes, `.part` files), oldest first.

    Only this endpoint's regular files are taken; a spool shared by two daemons stays untouched.
    A symbolic link or anything else that is not a regular file, under a spool file's name, is
    logged and left alone: never truncated, renamed, delivered or uploaded (`lstat`, no link is
    followed).
    """
    sealed: list[tuple[float, str, int]] = []
    parts: list[str] = []
    prefix = endpoint + "."
    with os.scandir(spool_dir) as it:
        for entry in it:
            if not entry.name.startswith(prefix):
                continue
            if not entry.name.endswith((spool.SEALED, spool.SEALED + spool.PART)):
                continue
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                log.warning(
                    "spool: %s is not a regular file (%s); left alone, never delivered",
                    entry.path,
                    "a symbolic link" if stat.S_ISLNK(st.st_mode) else f"mode {st.st_mode:o}",
                )
                continue
            if entry.name.endswith(spool.SEALED):
                sealed.append((st.st_mtime, entry.path, st.st_size))
            else:
                parts.append(entry.path)
    sealed.sort()
    return [(p, s) for _, p, s in sealed], sorted(parts)
