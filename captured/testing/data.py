"""Test data: seeded request/response pairs shaped like a tabular model's traffic, and a
`DataCaptureConfig` for encoder tests.

A request is one CSV line of numeric features ending in "\\n" (about `size` bytes); a response is
one score such as "0.0121608814". Only `DISTINCT` different pairs are generated and then cycled,
so a million-record run holds a million references to a thousand objects, not a million bodies.
The benchmarks (bench/) send these pairs, and the tests check that they encode and read back.
"""

from __future__ import annotations

import random

from captured.service.datacapture import CaptureContentTypeHeader, CaptureOption, DataCaptureConfig

#: How many different pairs `payloads` generates before it starts cycling them.
DISTINCT = 1024

#: `--payload` choices of the benchmarks -> request body size in bytes.
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


def dcc(
    csv: tuple[str, ...] | None = ("text/csv",),
    js: tuple[str, ...] | None = ("application/json",),
    modes: tuple[str, ...] = ("Input", "Output"),
    header: bool = True,
) -> DataCaptureConfig:
    """A DataCaptureConfig for encoder tests: 100 %, these capture modes and content types."""
    return DataCaptureConfig(
        InitialSamplingPercentage=100,
        DestinationS3Uri="file:///tmp/out",
        CaptureOptions=tuple(CaptureOption(m) for m in modes),
        CaptureContentTypeHeader=CaptureContentTypeHeader(csv, js) if header else None,
    )
