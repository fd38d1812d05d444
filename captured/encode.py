"""Records -> SageMaker Data Capture JSON Lines (spec sections 3 and 4).

One line per sampled request, compact JSON, keys in SageMaker's order::

    {"captureData":{"endpointInput":{...},"endpointOutput":{...}},
     "eventMetadata":{"eventId":...,"inferenceId":...,"customAttributes":...,"inferenceTime":...},
     "eventVersion":"0"}

`inferenceId` and `customAttributes` appear only when the caller gave them. The line structs
below mirror that layout field by field so that msgspec writes the keys in this order and a
whole group of lines is encoded by one `encode_lines` call.

Encoding of each side (spec section 4): the media type (before `;`, stripped, lower-cased) is
looked up in `CsvContentTypes`, then `JsonContentTypes`; a hit keeps the body as text (CSV /
JSON) unless it is not valid UTF-8; anything else, a missing content type, or no
`CaptureContentTypeHeader` at all, is BASE64 of the raw bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import msgspec

from .config import DataCaptureConfig
from .frames import Record
from .record import MAX_EPOCH_S

CSV = "CSV"
JSON = "JSON"
BASE64 = "BASE64"


class Side(msgspec.Struct, gc=False):
    observedContentType: str | None
    mode: str
    # str for CSV/JSON; bytes for BASE64 (msgspec writes bytes as padded standard base64).
    data: str | bytes
    encoding: str


class CaptureData(msgspec.Struct, gc=False, omit_defaults=True):
    endpointInput: Side | None = None
    endpointOutput: Side | None = None


class EventMetadata(msgspec.Struct, gc=False, omit_defaults=True):
    eventId: str
    inferenceId: str | None = None
    customAttributes: str | None = None
    # Always set; the default only lets the optional fields above come first (key order).
    inferenceTime: str = ""


class Line(msgspec.Struct, gc=False):
    captureData: CaptureData
    eventMetadata: EventMetadata
    eventVersion: str = "0"


class Group(NamedTuple):
    """The lines of one (variant, hour), and the time of its first record (names a new file)."""

    first_time: float
    lines: list[Line]


def media_type(content_type: str) -> str:
    """The part of a content type before `;`, stripped and lower-cased (spec 4, step 1)."""
    return content_type.partition(";")[0].strip().lower()


def choose_encoding(
    content_type: str | None, csv_types: frozenset[str] | None, json_types: frozenset[str] | None
) -> str:
    """The encoding a side's content type calls for, before the UTF-8 check (spec 4)."""
    if content_type is None or (csv_types is None and json_types is None):
        return BASE64
    mt = media_type(content_type)
    if csv_types is not None and mt in csv_types:
        return CSV
    if json_types is not None and mt in json_types:
        return JSON
    return BASE64


def format_time(epoch_s: int) -> str:
    """`2021-05-18T00:29:02Z`: UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


# Output layout of a UUID string: for each of its 36 characters, the hex digit (0..31) of the
# random value it shows, or a constant: "-", the version "4", or "V" for the RFC 4122 variant
# digit (8, 9, a or b, from the random digit at 16).
_UUID_LAYOUT: list[int | str] = [
    *range(0, 8),
    "-",
    *range(8, 12),
    "-",
    "4",
    *range(13, 16),
    "-",
    "V",
    *range(17, 20),
    "-",
    *range(20, 32),
]
_TO_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")


def new_event_ids(n: int) -> list[str]:
    """`n` random version-4 UUID strings.

    Built column by column (one C-level slice assignment per character position) from one
    `os.urandom` call, then split once: about ten times cheaper than `str(uuid.uuid4())`.
    """
    if n <= 0:
        return []
    h = os.urandom(16 * n).hex().encode()
    out = bytearray(b"\n" * (37 * n))
    for j, src in enumerate(_UUID_LAYOUT):
        if src == "V":
            out[j::37] = h[16::32].translate(_TO_VARIANT)
        elif isinstance(src, str):
            out[j::37] = src.encode() * n
        else:
            out[j::37] = h[src::32]
    return out[:-1].decode().split("\n")


class LineEncoder:
    """Turns decoded records into `Line`s and `Line` groups into JSON Lines bytes.

    Built from one `DataCaptureConfig`; holds small bounded caches (content type -> encoding,
    second -> formatted time) so that the per-record work is a few dict lookups.
    """

    _CACHE_MAX = 4096

    def __init__(self, dcc: DataCaptureConfig) -> None:
        header = dcc.CaptureContentTypeHeader
        self._csv = frozenset(map(media_type, header.CsvContentTypes or ())) if header else None
        self._json = frozenset(map(media_type, header.JsonContentTypes or ())) if header else None
        if header is not None and not header.CsvContentTypes:
            self._csv = None
        if header is not None and not header.JsonContentTypes:
            self._json = None
        self.capture_input = dcc.capture_input
        self.capture_output = dcc.capture_output
        self._enc_cache: dict[str, str] = {}
        self._time_cache: dict[int, str] = {}
        self._json_encoder = msgspec.json.Encoder()

    def encoding_for(self, content_type: str | None) -> str:
        if content_type is None:
            return BASE64
        enc = self._enc_cache.get(content_type)
        if enc is None:
            if len(self._enc_cache) >= self._CACHE_MAX:
                self._enc_cache.clear()
            enc = self._enc_cache[content_type] = choose_encoding(content_type, self._csv, self._json)
        return enc

    def time_string(self, second: int) -> str:
        s = self._time_cache.get(second)
        if s is None:
            if len(self._time_cache) >= self._CACHE_MAX:
                self._time_cache.clear()
            s = self._time_cache[second] = format_time(second)
        return s

    def group_lines(
        self,
        records: Sequence[Record],
        default_variant: str,
        variant_ok: Callable[[str], bool],
    ) -> tuple[dict[tuple[str, int], Group], int]:
        """Lines of `records` grouped by (variant, UTC hour), and how many records were refused.

        A record is refused when its time is not a usable epoch second (NaN, negative, past
        year 9999), its variant name fails `variant_ok`, or its metadata breaks SageMaker's
        rules (inferenceId printable, not starting with a space; customAttributes ASCII; the
        lengths are the decoder's business, see `frames.Record`). A side is present when its mode is
        captured and the record has that body. This loop is the daemon's hottest code: the
        work per record is inlined on purpose (no helper calls, positional struct
        construction, cache lookups only).
        """
        groups: dict[tuple[str, int], Group] = {}
        ids = new_event_ids(len(records))
        enc_cache = self._enc_cache
        time_cache = self._time_cache
        cap_in = self.capture_input
        cap_out = self.capture_output
        last_variant = ""
        last_hour = -1
        last_lines: list[Line] = []
        last_second = -1
        ts = ""
        invalid = 0
        for r, new_id in zip(records, ids, strict=True):
            t = r.inference_time
            if not 0.0 <= t < MAX_EPOCH_S:  # also false for NaN
                invalid += 1
                continue
            variant = r.variant_name
            if variant is None:
                variant = default_variant
            elif not variant_ok(variant):
                invalid += 1
                continue
            # The metadata rules `record.prepare_record` applies in the client, for peers that do
            # not use it. Lengths are checked by the decoder already (`frames.Record`); what it
            # cannot check costs one None test per field in the common case.
            text = r.inference_id
            if text is not None and not (text.isprintable() and text[0] != " "):
                invalid += 1
                continue
            text = r.custom_attributes
            if text is not None and not text.isascii():
                invalid += 1
                continue
            second = int(t)
            inp = out = None
            body = r.request
            if body is not None and cap_in:
                ct = r.request_content_type
                e = enc_cache.get(ct) if ct is not None else BASE64
                if e is None:
                    e = self.encoding_for(ct)
                if e is BASE64:
                    inp = Side(ct, "INPUT", body, BASE64)
                else:
                    try:
                        inp = Side(ct, "INPUT", body.decode("utf-8"), e)
                    except UnicodeDecodeError:  # not text after all: never mangle, use BASE64
                        inp = Side(ct, "INPUT", body, BASE64)
            body = r.response
            if body is not None and cap_out:
                ct = r.response_content_type
                e = enc_cache.get(ct) if ct is not None else BASE64
                if e is None:
                    e = self.encoding_for(ct)
                if e is BASE64:
                    out = Side(ct, "OUTPUT", body, BASE64)
                else:
                    try:
                        out = Side(ct, "OUTPUT", body.decode("utf-8"), e)
                    except UnicodeDecodeError:  # not text after all: never mangle, use BASE64
                        out = Side(ct, "OUTPUT", body, BASE64)
            if second != last_second:  # records of a batch mostly share their second
                last_second = second
                ts = time_cache.get(second) or self.time_string(second)
            line = Line(
                CaptureData(inp, out),
                EventMetadata(r.event_id or new_id, r.inference_id, r.custom_attributes, ts),
            )
            hour = second // 3600
            if hour != last_hour or variant != last_variant:
                key = (variant, hour)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = Group(t, [])
                last_variant, last_hour, last_lines = variant, hour, group.lines
            last_lines.append(line)
        return groups, invalid

    def encode(self, lines: Iterable[Line]) -> bytes:
        """JSON Lines: one compact object per line, each followed by `\\n`."""
        return self._json_encoder.encode_lines(lines)
