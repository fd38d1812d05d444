"""Blocking flushes off the event loop: fdatasync, rename and the directory's fsync, in order.

The spool hands `Syncer.run(work, then)` the file calls that may wait for the disk; `then` comes
back on the event loop once `work` succeeded. `ThreadSyncer` runs them on one background thread,
in submission order (a seal's rename after its flush, after the journal's flush queued before
it); the base `Syncer` runs them inline (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable

log = logging.getLogger("captured.spool")


class Syncer:
    """Runs `work` (blocking file calls), then, if it succeeded, `then` on the caller's thread.

    This one runs both inline, and `work`'s exceptions reach the caller.
    """

    def run(self, work: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        work()
        if then is not None:
            then()

    def busy(self) -> bool:
        return False

    async def wait(self) -> None:
        return None


class ThreadSyncer(Syncer):
    """One background thread, in submission order; `then` comes back on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool-sync")
        self._pending: set[concurrent.futures.Future[None]] = set()

    def run(self, work: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        def job() -> None:
            try:
                work()
            except OSError as exc:
                log.error("spool: %s", exc)
            else:
                if then is not None:
                    self._loop.call_soon_threadsafe(then)

        fut = self._pool.submit(job)
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    def busy(self) -> bool:
        return bool(self._pending)

    async def wait(self) -> None:
        """Until everything submitted so far has run (and its `then` was scheduled)."""
        while self._pending:
            await asyncio.wrap_future(next(iter(self._pending)))
        await asyncio.sleep(0)  # let the `then` callbacks run


def sync_and_close(fd: int) -> Callable[[], None]:
    def work() -> None:
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    return work


def sync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
