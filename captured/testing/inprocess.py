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

`write_config(root)` writes and loads the config a `DaemonProcess(root)` would run on;
`delivered_files` / `delivered_lines` read what reached its `file://` destination after the
`async with` block (the daemon seals and delivers on stop); `csv_pair` and `raw_records` are
the records the daemon tests send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from captured.service.config import Config, load_config
from captured.service.configfile import Overrides
from captured.service.daemon import TICK_S, Clock, Daemon
from captured.testing.daemon import DaemonProcess

T = TypeVar("T")


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
    cfg: Config,
    *,
    clock: Clock | None = None,
    timeout_s: float = 15.0,
    reload: Callable[[], Config] | None = None,
) -> AsyncIterator[Daemon]:
    """Start a `Daemon` on the running loop, yield it once it listens, then stop it in order
    (as SIGTERM does) and check that it exited 0. Must run in the main thread (signal handlers).
    `reload`: what `daemon.reload()` (SIGHUP) reads, as `serve` passes the config files."""
    daemon = Daemon(cfg, reload, clock=clock)
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


async def eventually(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """`captured.testing.daemon.wait_for` on the event loop: call `predicate` every `interval`
    seconds (the daemon runs in between) until it returns a true value, and return that value;
    raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def status_doc(daemon: Daemon) -> dict[str, Any]:
    """The STATUS document as a client reads it (what `DaemonProcess.status()` returns)."""
    doc: dict[str, Any] = msgspec.to_builtins(daemon.status())
    return doc


def write_config(
    root: Path, extra_toml: str = "", data_capture: str | None = None, overrides: Overrides | None = None
) -> Config:
    """The config a `DaemonProcess(root)` would run on (its socket, spool and `file://`
    destination `root / "out"`), written to `root / "captured.toml"` and loaded as `serve` loads
    it. `extra_toml` goes before `[DataCaptureConfig]`; `data_capture` replaces the default table
    as given; `overrides` are what `serve`'s command-line flags set."""
    d = DaemonProcess(root, extra_toml)
    d.write_config(data_capture)
    return load_config(str(d.config_path), overrides=overrides or Overrides())


def delivered_files(root: Path) -> list[Path]:
    """The JSON Lines files delivered to `root / "out"`, sorted (see `write_config`)."""
    out = root / "out"
    return sorted(out.rglob("*.jsonl")) if out.exists() else []


def delivered_lines(root: Path) -> list[dict[str, Any]]:
    """Every line delivered to `root / "out"`, parsed."""
    return [json.loads(line) for p in delivered_files(root) for line in p.read_text().splitlines()]


def csv_pair(i: int) -> dict[str, Any]:
    """`capture()`'s keyword arguments for a CSV request/response pair with inference id `i`."""
    return dict(
        request_body=f"{i},0,159.3,66\n".encode(),
        response_body=b"0.5",
        request_content_type="text/csv",
        response_content_type="text/csv",
        inference_id=str(i),
    )


def raw_records(n: int, start: int = 0) -> bytes:
    """BATCH frames of `n` CSV records (inference ids `start`...) as a client sends them."""
    from captured.client.record import batch_frames, prepare_record

    recs = [
        prepare_record(f"{i},1\n", "0", "text/csv", "text/csv", str(i), None, None, None, None, 1 << 20)
        for i in range(start, start + n)
    ]
    return b"".join(f for f, _ in batch_frames([r for r, _ in recs], [s for _, s in recs], 16 * 1024))
