"""What the daemon makes for each line: `eventId`s (random UUID4s, in blocks) and `inferenceTime`."""

from __future__ import annotations

import binascii
import os
import time


def format_time(epoch_s: int) -> str:
    """`2021-05-18T00:29:02Z`: UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


_TO_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")
_ID_SLOT = 40


def _event_id_block(n: int) -> bytearray:
    """`n` random version-4 UUIDs as `"xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx",`, `\\n` between.

    `hexlify(os.urandom(16 * n), b"-", 2)` already is 40 characters per id, random hex digits with
    a dash every four, and its dashes at 9, 14, 19 and 24 are where a UUID's go. Nine C-level
    strided slice operations then finish every id at once: three move a random digit from a
    place that becomes a constant to a place where a dash is not wanted (4, 29, 34), six write
    the constants (quotes, version, RFC 4122 variant digit, comma, newline): far cheaper per id
    than `str(uuid.uuid4())`, which took a sixth of a naive capture server's CPU (bench/README.md).
    """
    out = bytearray(binascii.hexlify(os.urandom(16 * n), b"-", 2))  # 40 * n - 1 bytes
    out[4::_ID_SLOT] = out[0::_ID_SLOT]
    out[29::_ID_SLOT] = out[37::_ID_SLOT]
    out[34::_ID_SLOT] = out[38::_ID_SLOT]
    out[0::_ID_SLOT] = b'"' * n
    out[15::_ID_SLOT] = b"4" * n
    out[20::_ID_SLOT] = out[20::_ID_SLOT].translate(_TO_VARIANT)
    out[37::_ID_SLOT] = b'"' * n
    out[38::_ID_SLOT] = b"," * n
    out[39::_ID_SLOT] = b"\n" * (n - 1)  # between ids: the last has no separator
    return out


def new_event_ids(n: int) -> list[str]:
    """`n` random version-4 UUID strings."""
    if n <= 0:
        return []
    return _event_id_block(n)[1:-2].decode().split('",\n"')


def new_event_id_pieces(n: int) -> list[bytes]:
    """`n` random version-4 UUIDs as `"<uuid>",`: JSON strings and the comma after them."""
    if n <= 0:
        return []
    return bytes(_event_id_block(n)).split(b"\n")
