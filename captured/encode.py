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
from collections.abc import Iterable

import msgspec

from .config import DataCaptureConfig

CSV = "CSV"
JSON = "JSON"
BASE64 = "BASE64"

#: Upper bound (exclusive) on epoch seconds we accept: year 10000, where ISO-8601 ends.
MAX_EPOCH_S = 253402300800.0


class Side(msgspec.Struct, gc=False):
    observedContentType: str | None
    mode: str
    # str for CSV/JSON; bytes for BASE64 (msgspec writes bytes as padded standard base64).
    data: str | bytes
    encoding: str


class CaptureData(msgspec.Struct, gc=False, omit_defaults=True):
    endpointInput: Side | None = None
    endpointOutput: Side | None = None


class EventMetadata(msgspec.Struct, gc=False, omit_defaults=True, kw_only=True):
    eventId: str
    inferenceId: str | None = None
    customAttributes: str | None = None
    inferenceTime: str


class Line(msgspec.Struct, gc=False):
    captureData: CaptureData
    eventMetadata: EventMetadata
    eventVersion: str = "0"


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


def side(content_type: str | None, mode: str, body: bytes, encoding: str) -> Side:
    """Build one side; a CSV/JSON body that is not valid UTF-8 falls back to BASE64."""
    if encoding is not BASE64:
        try:
            return Side(content_type, mode, body.decode("utf-8"), encoding)
        except UnicodeDecodeError:
            pass
    return Side(content_type, mode, body, BASE64)


def format_time(epoch_s: int) -> str:
    """`2021-05-18T00:29:02Z`: UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


_HEX_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_event_ids(n: int) -> list[str]:
    """`n` random (version 4) UUID strings, from one `os.urandom` call."""
    h = os.urandom(16 * n).hex()
    v = _HEX_VARIANT
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{v[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


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

    def line(
        self,
        *,
        request: bytes | None,
        response: bytes | None,
        request_content_type: str | None,
        response_content_type: str | None,
        second: int,
        event_id: str,
        inference_id: str | None,
        custom_attributes: str | None,
    ) -> Line:
        """One record's line; a side is present when its mode is captured and it has a body."""
        inp = out = None
        if request is not None and self.capture_input:
            inp = side(request_content_type, "INPUT", request, self.encoding_for(request_content_type))
        if response is not None and self.capture_output:
            out = side(response_content_type, "OUTPUT", response, self.encoding_for(response_content_type))
        meta = EventMetadata(
            eventId=event_id,
            inferenceId=inference_id,
            customAttributes=custom_attributes,
            inferenceTime=self.time_string(second),
        )
        return Line(CaptureData(inp, out), meta)

    def encode(self, lines: Iterable[Line]) -> bytes:
        """JSON Lines: one compact object per line, each followed by `\\n`."""
        return self._json_encoder.encode_lines(lines)
