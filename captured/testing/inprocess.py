"""The daemon inside the test's own event loop, on a clock the test moves: `run_daemon`.

    async def main():
        clock = FakeClock()
        async with run_daemon(config, clock=clock) as daemon:
            ...                              # clients connect to config.socket_path
            clock.advance(3600)              # an hour passes for the spool and delivery
            await daemon_ticks(daemon)       # the daemon's next heartbeat sees it
            assert daemon.status().counters.written == ...
    asyncio.run(main())

Behaviour that needs no process boundary (rotation, sampling, counters, status, reload) is
tested this way: no subprocess, no sleeping for an hour. Signals, exit codes, SIGKILL recovery
and socket activation keep their subprocess tests (`captured.testing.daemon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from captured.service.config import Config
from captured.service.daemon import TICK_S, Clock, Daemon


class FakeClock(Clock):
    """A wall clock and a monotonic clock that move only when told (`advance`)."""

    def __init__(self, wall: float | None = None) -> None:
        self._wall = time.time() if wall is None else wall
        self._monotonic = 1_000.0

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._monotonic += seconds


@contextlib.asynccontextmanager
async def run_daemon(
    cfg: Config, *, clock: Clock | None = None, timeout_s: float = 15.0
) -> AsyncIterator[Daemon]:
    """Start a `Daemon` on the running loop, yield it once it listens, then stop it in order
    (as SIGTERM does) and check that it exited 0. Must run in the main thread (signal handlers)."""
    daemon = Daemon(cfg, clock=clock)
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            raise RuntimeError(f"the daemon exited with {task.result()} before it was ready")
        task.cancel()
        raise TimeoutError("the daemon did not become ready")
    try:
        yield daemon
    finally:
        daemon.stop()
        rc = await asyncio.wait_for(task, timeout_s + cfg.s3.shutdown_timeout_s + cfg.ingest.drain_timeout_s)
    if rc != 0:
        raise RuntimeError(f"the daemon exited with {rc}")


async def daemon_ticks(daemon: Daemon, n: int = 2) -> None:
    """Let the daemon's heartbeat run `n` times (rotation, the watermark, the journal)."""
    await asyncio.sleep(TICK_S * n + 0.05)
    await daemon.spool.syncer.wait()
