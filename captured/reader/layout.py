"""Where captures lie (spec section 5) and how a read selects them, as Model Monitor does (pure).

    {root}/{endpoint}/{variant}/{yyyy}/{mm}/{dd}/{hh}/{MM}-{SS}-{mmm}-{uuid}.jsonl[.zst]

`Selection` holds what a read asks for; `place(relative key)` tells a key's endpoint, variant and
hour (None for a file outside the layout); an hour is read when it overlaps [start, end).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import NamedTuple

import msgspec

HOUR = dt.timedelta(hours=1)
#: A capture file's name: SageMaker's and ours (`.jsonl`), or compressed (`.jsonl.zst`).
_KEY = re.compile(
    r"(?P<endpoint>[^/]+)/(?P<variant>[^/]+)/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<h>\d{2})/"
    r"(?P<name>[^/]+\.jsonl(?:\.zst)?)"
)
CAPTURE_SUFFIXES = (".jsonl", ".jsonl.zst")


class Place(NamedTuple):
    endpoint: str
    variant: str
    hour: dt.datetime  # aware, UTC, the start of the hour


def place(relative_key: str) -> Place | None:
    """The endpoint, variant and hour of a key relative to the root; None outside the layout."""
    m = _KEY.fullmatch(relative_key)
    if m is None:
        return None
    try:
        hour = dt.datetime(int(m["y"]), int(m["m"]), int(m["d"]), int(m["h"]), tzinfo=dt.UTC)
    except ValueError:
        return None
    return Place(m["endpoint"], m["variant"], hour)


def parse_when(text: str | dt.datetime | None) -> dt.datetime | None:
    """An ISO 8601 time (UTC when it names no offset; `Z` accepted), as an aware UTC datetime."""
    if text is None or isinstance(text, dt.datetime):
        value = text
    else:
        try:
            value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2024-06-01T12:00Z)") from None
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


class Selection(msgspec.Struct, frozen=True):
    """What a read takes: hours overlapping [start, end), then records by their time, endpoint,
    variant and inference id (None: any)."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None
    endpoint: str | None = None
    variant: str | None = None
    inference_ids: frozenset[str] | None = None

    def wants_place(self, p: Place) -> bool:
        if self.endpoint is not None and p.endpoint != self.endpoint:
            return False
        if self.variant is not None and p.variant != self.variant:
            return False
        if self.start is not None and p.hour + HOUR <= self.start:
            return False
        return self.end is None or p.hour < self.end

    def wants_record(self, when: dt.datetime, inference_id: str | None) -> bool:
        if self.start is not None and when < self.start:
            return False
        if self.end is not None and when >= self.end:
            return False
        return self.inference_ids is None or inference_id in self.inference_ids

    def hours(self, limit: int) -> list[dt.datetime] | None:
        """The hours the window overlaps, if it is bounded and at most `limit` of them."""
        if self.start is None or self.end is None or self.end <= self.start:
            return None if self.start is None or self.end is None else []
        first = self.start.replace(minute=0, second=0, microsecond=0)
        count = int((self.end - first) / HOUR) + 1
        if count > limit:
            return None
        return [h for h in _each_hour(first, count) if h < self.end]


def _each_hour(first: dt.datetime, count: int) -> Iterator[dt.datetime]:
    for i in range(count):
        yield first + i * HOUR


def hour_prefix(hour: dt.datetime) -> str:
    return hour.strftime("%Y/%m/%d/%H/")
