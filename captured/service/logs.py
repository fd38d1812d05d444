"""Logging set-up and a rate limiter for lines that hostile or broken peers could repeat."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("captured")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class RateLimited:
    """Logs a given key at most once per `interval_s`; says how many were suppressed."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) > 1024:  # keys come from a small fixed set; this is only a backstop
            self._last.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" ({suppressed} similar suppressed)"
        self._log.warning(msg, *args)
