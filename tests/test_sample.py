"""The sampling decision."""

from __future__ import annotations

import random

from captured.daemon.sample import sample


def test_zero_and_hundred_are_exact() -> None:
    items = list(range(1000))
    assert sample(items, 100) == items
    assert sample(items, 0) == []


def test_twenty_percent_is_within_a_statistical_bound() -> None:
    n = 20000
    kept = len(sample(range(n), 20, random.Random(1).random))
    # Binomial(20000, 0.2): sd = 56.6; six sd either side never fails by chance in practice.
    assert abs(kept - 4000) < 6 * 56.6


def test_order_is_kept() -> None:
    kept = sample(list(range(100)), 50, random.Random(2).random)
    assert kept == sorted(kept)
