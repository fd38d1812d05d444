"""The sampling decision (spec section 6): per request, input and output together.

Two modes, per endpoint (`sampling_mode`):

- `random` (SageMaker's): one uniform draw per record.
- `inference_id`: a pure function of the inference id and the percentage (`keep_id`), so the
  same request is kept on every host, by every daemon, in every variant and after a restart. A
  record without an inference id falls back to a random draw.

`keep_id`, exactly (README, "Sampling"): take the SHA-256 digest of the inference id's UTF-8
bytes; read its first 8 bytes as an unsigned big-endian 64-bit integer `h`; keep the record
when `h * 100 < percentage * 2**64`. SHA-256 because every SQL engine and language has it
(DuckDB and Athena `sha256`, Spark `sha2(..., 256)`), so a user can tell which ids are kept
without asking the daemon; its bits are uniform, so the kept fraction is the percentage.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from captured.wire.frames import Record

T = TypeVar("T")

RANDOM = "random"
INFERENCE_ID = "inference_id"

_SPAN = 1 << 64


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


def keep_id(inference_id: str, percentage: int) -> bool:
    """Whether `inference_id` is kept at `percentage` in `inference_id` mode (see the module)."""
    h = int.from_bytes(hashlib.sha256(inference_id.encode()).digest()[:8], "big")
    return h * 100 < percentage * _SPAN


def sample_by_id(
    records: Sequence[Record], percentage: int, rand: Callable[[], float] = random.random
) -> list[Record]:
    """`inference_id` mode: records with an id by `keep_id`, those without by a random draw."""
    if percentage >= 100:
        return list(records)
    if percentage <= 0:
        return []
    p = percentage / 100.0
    limit = percentage * _SPAN
    sha256 = hashlib.sha256
    return [
        r
        for r in records
        if (
            rand() < p
            if r.inference_id is None
            else int.from_bytes(sha256(r.inference_id.encode()).digest()[:8], "big") * 100 < limit
        )
    ]
