"""The sampling decision (spec section 6): per request, input and output together."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def sample(records: Sequence[T], percentage: int, rand: Callable[[], float] = random.random) -> list[T]:
    """Keep each record with probability `percentage` / 100.

    0 and 100 are exact and cost nothing per record; in between, one uniform draw per record.
    """
    if percentage >= 100:
        return list(records)
    if percentage <= 0:
        return []
    p = percentage / 100.0
    return [r for r in records if rand() < p]
