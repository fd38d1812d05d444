"""The disk watermark: the rule, the gate, and a real daemon on a real filesystem (in-process,
`captured.testing.inprocess`; a spool write failing on a file-size limit needs its own process)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from captured import CaptureClient
from captured.client.aio import AsyncCaptureClient
from captured.daemon.watermark import (
    CHECK_EVERY_BYTES,
    CHECK_EVERY_S,
    WRITE_RETRY_S,
    CaptureGate,
    Usage,
    decide,
)
from captured.service.daemon import Daemon
from captured.service.settings import WatermarkConfig
from captured.testing.inprocess import (
    FakeClock,
    daemon_ticks,
    delivered_files,
    delivered_lines,
    run_daemon,
    status_doc,
    write_config,
)

GB = 10**9
CFG = WatermarkConfig(high_percent=75, low_percent=70, min_free_bytes=0)


def usage(percent: float, free: int = 50 * GB, total: int = 100 * GB) -> Usage:
    return Usage(total, total - free, free, percent)


@pytest.mark.parametrize(
    ("stopped", "percent", "free", "cfg", "stops"),
    [
        (False, 74.9, 25 * GB, CFG, False),
        (False, 75.0, 25 * GB, CFG, True),  # "at or above"
        (True, 72.0, 28 * GB, CFG, True),  # between the marks: stays stopped
        (True, 70.0, 30 * GB, CFG, False),  # back at low_percent
        (False, 10.0, 4 * GB, WatermarkConfig(75, 70, 5 * GB), True),  # min_free_bytes
        (True, 10.0, 6 * GB, WatermarkConfig(75, 70, 5 * GB), True),  # needs 5 GB + 5 % of 100 GB
        (True, 10.0, 10 * GB, WatermarkConfig(75, 70, 5 * GB), False),
    ],
)
def test_decide(stopped: bool, percent: float, free: int, cfg: WatermarkConfig, stops: bool) -> None:
    assert (decide(stopped, usage(percent, free), cfg) is not None) is stops


class FakeDisk:
    def __init__(self) -> None:
        self.percent = 50.0
        self.now = 0.0
        self.reads = 0

    def usage(self, path: str) -> Usage:
        self.reads += 1
        return usage(self.percent)

    def clock(self) -> float:
        return self.now


def test_gate_checks_on_the_timer_and_every_few_mib_not_per_write() -> None:
    disk = FakeDisk()
    gate = CaptureGate("/spool", CFG, usage=disk.usage, clock=disk.clock)
    gate.check()
    assert gate.open and disk.reads == 1
    gate.tick()  # less than a second later: no read
    for _ in range(100):
        gate.written(1000)
    assert disk.reads == 1
    disk.percent = 80.0
    gate.written(CHECK_EVERY_BYTES)
    assert disk.reads == 2 and not gate.open and "80.0%" in (gate.reason or "")
    disk.percent = 72.0
    disk.now += 1.0
    gate.tick()
    assert disk.reads == 3 and not gate.open
    disk.percent = 69.0
    disk.now += 1.0
    gate.tick()
    assert gate.open and gate.reason is None and gate.stops == 1


def test_gate_after_a_failed_write_waits_then_tries_again() -> None:
    disk = FakeDisk()
    gate = CaptureGate("/spool", CFG, usage=disk.usage, clock=disk.clock)
    gate.check()
    gate.write_failed(OSError(28, "No space left on device"))
    assert not gate.open and "No space left" in (gate.reason or "")
    disk.now += WRITE_RETRY_S / 2
    gate.check()
    assert not gate.open
    disk.now += WRITE_RETRY_S
    gate.check()
    assert gate.open


# -- a real daemon on the real filesystem --------------------------------------------------------


async def send(socket_path: str, n: int, start: int = 0) -> None:
    async with AsyncCaptureClient(socket_path) as client:
        for i in range(start, start + n):
            assert client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
        assert await client.flush(timeout=10)


def ids_delivered(root: Path) -> list[int]:
    return sorted(int(line["eventMetadata"]["inferenceId"]) for line in delivered_lines(root))


def adds_up(status: dict[str, Any]) -> bool:
    c = status["counters"]
    return bool(c["received"] == c["written"] + sum(c["dropped"].values()))


async def until_status(
    daemon: Daemon, clock: FakeClock, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> None:
    """The gate reads the disk on the daemon's heartbeat, at most once a second of its (fake)
    clock: move the clock a check interval at a time until `predicate(status)` holds."""
    deadline = time.monotonic() + timeout
    while not predicate(status_doc(daemon)):
        assert time.monotonic() < deadline, "condition not met in time"
        clock.advance(CHECK_EVERY_S)
        await daemon_ticks(daemon, 1)


def test_capture_stops_past_high_percent_and_says_why(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With high_percent below what the spool's filesystem already uses, the daemon starts with
    capture Stopped: records are read and dropped as disk_watermark, status and log say why."""
    used = psutil.disk_usage(str(short_tmp)).percent
    high = max(used / 2, 0.02)
    cfg = write_config(
        short_tmp, extra_toml=f"[watermark]\nhigh_percent = {high}\nlow_percent = {high / 2}\n"
    )

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, 50)
            st = status_doc(daemon)
            assert st["CaptureStatus"] == "Stopped" and "reached high_percent" in st["CaptureStatusReason"]
            assert st["counters"]["dropped"] == {"disk_watermark": 50} and adds_up(st)
            assert st["watermark"]["capturing"] is False and st["watermark"]["used_percent"] >= high

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon checks that the daemon exited 0
    assert "capture Stopped: disk usage" in caplog.text and delivered_files(short_tmp) == []


def test_capture_stops_below_min_free_bytes_and_starts_again_when_space_returns(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """min_free_bytes set 256 MB below what is free now: a 512 MB file taking real blocks on the
    same filesystem stops capture (uploads or deliveries go on), deleting it starts capture again;
    every record before and after is delivered exactly once, the ones in between are counted."""
    free = psutil.disk_usage(str(short_tmp)).free
    if free < 2 * 10**9:
        pytest.skip("needs 2 GB free on the temporary filesystem")
    min_free = free - 256 * 2**20
    cfg = write_config(
        short_tmp,
        extra_toml=(
            "[spool]\nmax_file_age_s = 0.5\n"
            f"[watermark]\nhigh_percent = 100\nlow_percent = 99.999\nmin_free_bytes = {min_free}\n"
        ),
    )
    clock = FakeClock()

    async def main() -> None:
        async with run_daemon(cfg, clock=clock) as daemon:
            await send(cfg.socket_path, 100)
            filler = short_tmp / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, 512 * 2**20)
            finally:
                os.close(fd)
            try:
                await until_status(daemon, clock, lambda st: st["CaptureStatus"] == "Stopped")
                await send(cfg.socket_path, 100, start=100)
                assert status_doc(daemon)["counters"]["dropped"].get("disk_watermark") == 100
            finally:
                filler.unlink()
            await until_status(daemon, clock, lambda st: st["CaptureStatus"] == "Started")
            await send(cfg.socket_path, 100, start=200)
            st = status_doc(daemon)
            assert st["counters"]["written"] == 200 and adds_up(st)

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon checks that the daemon exited 0
    assert ids_delivered(short_tmp) == [*range(100), *range(200, 300)]
    log = caplog.text
    assert "capture Stopped" in log and "min_free_bytes" in log and "capture Started again" in log


def test_a_failing_spool_write_stops_capture_keeps_whole_lines_and_resumes(daemon_factory: Any) -> None:
    """The daemon may not grow a file past 256 KiB (RLIMIT_FSIZE: writes fail with EFBIG, as they
    would with ENOSPC). The failing write is cut out, the file is sealed with whole lines only,
    capture stops for a while and starts again on a new file; the daemon never dies, every
    delivered line parses, and the counters add up to what was sent."""
    limit = 256 * 1024

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    d = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 30\n")
    d.preexec = small_files
    d.start()
    body = "1," * 500 + "\n"  # ~1 KB records: the limit is hit after ~200
    sent = 0
    deadline = time.monotonic() + 30
    with CaptureClient(d.socket_path) as client:
        while time.monotonic() < deadline:
            for _ in range(50):
                client.capture(body, "0", request_content_type="text/csv", inference_id=str(sent))
                sent += 1
            assert client.flush(timeout=10)
            st = d.status()
            if (
                st["watermark"]["stops"] >= 1
                and st["CaptureStatus"] == "Started"
                and st["counters"]["written"] > 250
            ):
                break
            time.sleep(0.1)
    st = d.status()
    assert st["counters"]["received"] == sent and adds_up(st), st["counters"]
    assert st["counters"]["dropped"].get("write_error", 0) >= 1
    assert st["watermark"]["stops"] >= 1 and st["CaptureStatus"] == "Started"
    assert d.stop() == 0
    lines = [json.loads(line) for p in d.delivered_files() for line in p.read_bytes().splitlines()]
    assert len(lines) == st["counters"]["written"]
    assert all(p.stat().st_size <= limit for p in d.delivered_files())
    assert "spool write failed" in d.log() and "File too large" in d.log()
