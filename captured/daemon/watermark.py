"""The disk watermark: capture stops before the spool's filesystem fills, and starts again later.

SageMaker stops capturing when the disk is 75 % used so that inference is never hurt; so does
`captured`. `CaptureGate` holds the state (open or stopped, and why); the pipeline asks
`gate.open` once per batch and drops a stopped batch under `disk_watermark`. The filesystem is
read with `psutil.disk_usage` on the daemon's timer (at most once a second) and after every
`CHECK_EVERY_BYTES` written, never per record.

A write to the spool that fails (ENOSPC, EIO, a quota: any OSError) also stops capture, for
`WRITE_RETRY_S`; then the gate opens on trial, and the next write tells whether the cause is gone.
`decide` is the pure rule, tested apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import msgspec
import psutil

from captured.service.settings import WatermarkConfig

log = logging.getLogger("captured.watermark")

#: Bytes written between two checks besides the timer (a burst cannot run far past the mark).
CHECK_EVERY_BYTES = 8 * 1024 * 1024
#: The timer's pace.
CHECK_EVERY_S = 1.0
#: After a failed spool write, capture stays stopped this long before it is tried again.
WRITE_RETRY_S = 5.0


class Usage(NamedTuple):
    total: int
    used: int
    free: int
    percent: float


def decide(stopped: bool, usage: Usage, cfg: WatermarkConfig) -> str | None:
    """Why capture must be (or stay) stopped with this usage, or None if it may run.

    Stops at or above `high_percent` used, or below `min_free_bytes` free; once stopped, starts
    again only at or below `low_percent` used and with `min_free_bytes` plus the same hysteresis
    (high - low, as a share of the filesystem) free, so it does not flap around one threshold.
    """
    if stopped:
        slack = int(usage.total * (cfg.high_percent - cfg.low_percent) / 100) if cfg.min_free_bytes else 0
        if usage.percent > cfg.low_percent:
            return f"disk usage {usage.percent:.1f}% is above low_percent {cfg.low_percent:g}"
        if usage.free < cfg.min_free_bytes + slack:
            return (
                f"{usage.free} bytes free, below min_free_bytes {cfg.min_free_bytes} + {slack} (hysteresis)"
            )
        return None
    if usage.percent >= cfg.high_percent:
        return f"disk usage {usage.percent:.1f}% reached high_percent {cfg.high_percent:g}"
    if usage.free < cfg.min_free_bytes:
        return f"{usage.free} bytes free, below min_free_bytes {cfg.min_free_bytes}"
    return None


def disk_usage(path: str) -> Usage:
    u = psutil.disk_usage(path)
    return Usage(int(u.total), int(u.used), int(u.free), float(u.percent))


class CaptureGate:
    """Open (capturing) or stopped, with the reason; logs each change once."""

    def __init__(
        self,
        path: str,
        cfg: WatermarkConfig,
        *,
        usage: Callable[[str], Usage] = disk_usage,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.cfg = cfg
        self._usage = usage
        self._clock = clock
        self.open = True
        self.reason: str | None = None
        self.since = time.time()
        self.stops = 0
        self.last: Usage | None = None
        self._checked_at = -1e18
        self._written = 0
        self._write_failed_at: float | None = None

    def check(self) -> bool:
        """Read the filesystem now and open or stop the gate; returns `open`."""
        self._checked_at = self._clock()
        self._written = 0
        try:
            self.last = self._usage(self.path)
        except OSError as exc:  # the spool's filesystem went away: nothing can be written anyway
            self._set(False, f"cannot read disk usage of {self.path}: {exc}")
            return self.open
        if self._write_failed_at is not None:
            if self._checked_at - self._write_failed_at < WRITE_RETRY_S:
                return self.open
            self._write_failed_at = None
            self._set(True, None, trial=True)
        reason = decide(not self.open, self.last, self.cfg)
        self._set(reason is None, reason)
        return self.open

    def tick(self) -> None:
        """The timer: check at most every `CHECK_EVERY_S`."""
        if self._clock() - self._checked_at >= CHECK_EVERY_S:
            self.check()

    def written(self, nbytes: int) -> None:
        """Bytes just written to the spool: check again after every few MiB."""
        self._written += nbytes
        if self._written >= CHECK_EVERY_BYTES:
            self.check()

    def write_failed(self, exc: OSError) -> None:
        """A spool write failed: stop now, try again after `WRITE_RETRY_S`."""
        self._write_failed_at = self._clock()
        self._set(False, f"spool write failed: {exc}")

    def _set(self, open_: bool, reason: str | None, trial: bool = False) -> None:
        if open_ == self.open:
            self.reason = reason  # still stopped: the figures in the reason move, no new line
            return
        was = self.reason
        self.open, self.reason, self.since = open_, reason, time.time()
        if not open_:
            self.stops += 1
            log.warning("capture Stopped: %s; incoming records are dropped (disk_watermark)", reason)
        elif trial:
            log.warning("capture Started again, on trial after a failed spool write (%s)", was)
        else:
            log.warning("capture Started again: %s", self._describe())

    def _describe(self) -> str:
        u = self.last
        if u is None:
            return "no reading yet"
        return f"disk usage {u.percent:.1f}%, {u.free} bytes free"

    def statistics(self) -> WatermarkStats:
        u = self.last
        return WatermarkStats(
            capturing=self.open,
            reason=self.reason,
            since=round(self.since, 3),
            stops=self.stops,
            used_percent=u.percent if u else None,
            free_bytes=u.free if u else None,
            total_bytes=u.total if u else None,
            high_percent=self.cfg.high_percent,
            low_percent=self.cfg.low_percent,
            min_free_bytes=self.cfg.min_free_bytes,
        )


class WatermarkStats(msgspec.Struct, frozen=True):
    """The gate and the last reading of the spool's filesystem (None before the first)."""

    capturing: bool
    reason: str | None
    #: Wall-clock time of the last change.
    since: float
    #: Times capture stopped for the disk.
    stops: int
    used_percent: float | None
    free_bytes: int | None
    total_bytes: int | None
    high_percent: float
    low_percent: float
    min_free_bytes: int
