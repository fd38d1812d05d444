"""Delivery: sealed spool files -> the destination, each exactly once, then removed locally.

The stage owns a queue of sealed files (bounded by the disk: the spool directory itself is the
durable queue) and `workers` worker tasks. A `Destination` puts one file under its object key; the
local spool file is deleted only after `put` returned, so a crash at any point leaves the file
in the spool for the next start, and the next `put` of the same key overwrites instead of
duplicating (the key is fixed by the file name).

`local.LocalDestination` implements `file://` URIs; `uploader.S3Uploader` is S3's; `router.Router`
sends each file to its endpoint's destination.

The stage runs as one task (`run`) holding its workers in a `TaskGroup`: a worker that fails of a
bug ends it, and the daemon with it, rather than leaving files waiting with nobody to move them.
Clocks are injected (`wall`, `monotonic`), so the retry policy can be tested without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from captured.daemon import spool
from captured.errors import DeliveryError

log = logging.getLogger("captured.deliver")


class Destination(Protocol):
    uri: str

    async def start(self) -> None: ...

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        """Store the file at `path` under the relative `key`; return once it is durably there.

        May consume (move) `path`; the caller removes it otherwise. Raises `DeliveryError` on
        failure (its `cause` is counted, its `retryable` says how soon to try again); anything
        else it raises is a bug, counted as `internal` and tried again slowly. `retry`:
        an earlier attempt at this key (this run's or an earlier run's) may have left something
        behind to clean up first.
        """

    async def tidy(self, own_prefix: str, waiting: Callable[[], set[str]]) -> None:
        """Clean up, in the background, what interrupted deliveries of an earlier run left under
        the relative `own_prefix` (the daemon's `{endpoint}/`) and no file waiting explains
        (`waiting()`: the relative keys of the files waiting now). Never raises."""

    async def close(self) -> None: ...


#: The cause of anything a destination raises that is not a `DeliveryError`: a bug.
INTERNAL = "internal"


class DeliveryStats(msgspec.Struct, frozen=True):
    """What delivery did and what waits (`captured status`: `delivery`)."""

    files_delivered: int
    bytes_delivered: int
    #: Attempts that failed and will be tried again.
    retries: int
    #: Failed attempts by cause (`disk_full`, `throttled`, `access_denied`, `internal`, ...).
    failures: dict[str, int]
    files_waiting: int
    bytes_waiting: int
    #: Age of the oldest file waiting (0 when none waits).
    oldest_waiting_s: float


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
        self,
        destination: Destination,
        *,
        workers: int = 1,
        fatal_retry_s: float | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.destination = destination
        self._wall = wall
        self._monotonic = monotonic
        if fatal_retry_s is not None:
            self.FATAL_RETRY_S = fatal_retry_s
        self.workers = workers
        self._queue: collections.deque[Waiting] = collections.deque()
        self._in_flight: list[Waiting] = []
        self._wake = asyncio.Event()
        self.files_delivered = 0
        self.bytes_delivered = 0
        self.retries = 0
        self.failures: dict[str, int] = {}
        self._logged_causes: set[str] = set()
        self._logged_bugs: set[type[Exception]] = set()  # a traceback once per kind of bug
        self._rng = random.Random()

    def submit(self, path: str, size: int, *, recovered: bool = False) -> None:
        self._queue.append(Waiting(path, size, self._wall(), recovered=recovered))
        self._wake.set()

    async def open(self) -> None:
        """Open the destination (start S3's uploader process): before `run`, so that a
        destination that cannot work stops the start-up."""
        await self.destination.start()

    async def run(self, own_prefixes: Sequence[str]) -> None:
        """Deliver until cancelled: the workers, a periodic report, and the destination's tidying
        of what an earlier run left under each of `own_prefixes` (`{endpoint}/`). A cancelled
        upload is abandoned (its file stays queued and in the spool); `close` then closes the
        destination."""
        async with asyncio.TaskGroup() as tasks:
            for i in range(self.workers):
                tasks.create_task(self._worker(), name=f"delivery-{i}")
            tasks.create_task(self._report(), name="delivery-report")
            for prefix in own_prefixes:
                tasks.create_task(self.destination.tidy(prefix, self._waiting_keys), name="delivery-tidy")

    async def close(self) -> None:
        await self.destination.close()

    def _waiting_keys(self) -> set[str]:
        return {spool.object_key(p) for p in self.waiting_paths()}

    def statistics(self) -> DeliveryStats:
        waiting = [*self._queue, *self._in_flight]
        return DeliveryStats(
            files_delivered=self.files_delivered,
            bytes_delivered=self.bytes_delivered,
            retries=self.retries,
            failures=dict(self.failures),
            files_waiting=len(waiting),
            bytes_waiting=sum(w.size for w in waiting),
            oldest_waiting_s=round(self._wall() - min(w.since for w in waiting), 3) if waiting else 0.0,
        )

    def waiting_paths(self) -> list[str]:
        return [w.path for w in (*self._queue, *self._in_flight)]

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted file is delivered (True) or `timeout_s` passes (False).

        Gives up early, once nothing is in flight and no waiting file is due for another attempt
        before the deadline (say every one failed for a cause retried every minute): waiting
        longer cannot deliver anything.
        """
        deadline = self._monotonic() + timeout_s
        while self._queue or self._in_flight:
            if self._monotonic() >= deadline:
                return False
            if not self._in_flight and all(w.not_before > deadline for w in self._queue):
                return False
            await asyncio.sleep(0.02)
        return True

    def _next(self) -> Waiting | float:
        """The oldest file due for an attempt, or how long until one is due."""
        now = self._monotonic()
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
        if isinstance(exc, DeliveryError):
            cause, retryable = exc.cause, exc.retryable
        else:  # a bug in the destination, not the destination failing: try again slowly
            cause, retryable = INTERNAL, False
        self.failures[cause] = self.failures.get(cause, 0) + 1
        self.retries += 1
        item.attempts += 1
        if retryable:
            cap = min(self.RETRY_MIN_S * 2 ** min(item.attempts - 1, 16), self.RETRY_MAX_S)
            delay = self._rng.uniform(cap / 2, cap)  # jitter: many files do not retry in lockstep
        else:
            delay = self.FATAL_RETRY_S
        item.not_before = self._monotonic() + delay
        self._queue.append(item)
        self._wake.set()
        if cause in self._logged_causes:
            return
        self._logged_causes.add(cause)
        key = spool.object_key(item.path)
        if not isinstance(exc, DeliveryError):
            first = type(exc) not in self._logged_bugs
            self._logged_bugs.add(type(exc))
            log.error(
                "delivery of %s failed unexpectedly (%s, a bug), retrying every %.0fs: %r",
                key,
                cause,
                self.FATAL_RETRY_S,
                exc,
                exc_info=exc if first else None,
            )
            return
        when = (
            f"retrying with backoff (up to {self.RETRY_MAX_S:.0f}s apart)"
            if retryable
            else f"retrying every {self.FATAL_RETRY_S:.0f}s until the cause is fixed"
        )
        log.warning("delivery of %s failed (%s), %s: %s", key, cause, when, exc)

    async def _report(self) -> None:
        """A periodic line while there is something to say: what moved, what waits, what fails."""
        last = (0, 0, 0)
        while True:
            await asyncio.sleep(self.REPORT_EVERY_S)
            now = (self.files_delivered, self.retries, len(self._queue) + len(self._in_flight))
            if now != last and now != (last[0], last[1], 0):
                st = self.statistics()
                log.info(
                    "delivery: %d files (%d bytes) delivered, %d retries, failures %s; %d files (%d bytes)"
                    " waiting, oldest %.0fs",
                    st.files_delivered,
                    st.bytes_delivered,
                    st.retries,
                    st.failures or "none",
                    st.files_waiting,
                    st.bytes_waiting,
                    st.oldest_waiting_s,
                )
            last = now
