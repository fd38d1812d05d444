"""Seeded request/response pairs shaped like a tabular model's traffic, shared by bench and tests.

A request is one CSV line of numeric features ending in "\\n" (about `size` bytes); a response is
one score such as "0.0121608814". Only `DISTINCT` different pairs are generated and then cycled,
so a million-record run holds a million references to a thousand objects, not a million bodies.
"""

from __future__ import annotations

import random

#: How many different pairs `payloads` generates before it starts cycling them.
DISTINCT = 1024

#: `--payload` choices -> request body size in bytes.
PAYLOAD_SIZES = {"250": 250, "8k": 8 * 1024}

Pair = tuple[bytes, bytes]


def csv_record(rng: random.Random, size: int = 250) -> Pair:
    """One (request, response) pair: `size` bytes of CSV features ending in "\\n", and a score."""
    features: list[str] = []
    length = 1  # the final "\n"
    while True:
        value = f"{rng.uniform(-100.0, 1000.0):.4f}" if rng.random() < 0.7 else str(rng.randrange(0, 100000))
        extra = len(value) + (1 if features else 0)
        if length + extra > size:
            break
        features.append(value)
        length += extra
    line = ",".join(features)
    # Pad the last feature with zeros so that every request is exactly `size` bytes.
    line += "0" * (size - 1 - len(line))
    request = (line + "\n").encode("ascii")
    response = f"{rng.random():.10f}".encode("ascii")
    return request, response


def payloads(n: int, seed: int = 0, size: int = 250) -> list[Pair]:
    """`n` pairs: the first `DISTINCT` are generated from `seed`, then repeated in order."""
    rng = random.Random(seed)
    distinct = [csv_record(rng, size) for _ in range(min(n, DISTINCT))]
    if not distinct:
        return []
    return [distinct[i % len(distinct)] for i in range(n)]


def body_bytes(pairs: list[Pair]) -> int:
    """Request plus response bytes of `pairs`."""
    return sum(len(req) + len(resp) for req, resp in pairs)
