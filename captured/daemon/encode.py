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

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import msgspec
import orjson

from captured.daemon.eventids import format_time, new_event_id_pieces, new_event_ids
from captured.service.datacapture import DataCaptureConfig
from captured.wire.frames import Record
from captured.wire.rules import MAX_EPOCH_S

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


class Uniform(NamedTuple):
    """A uniform batch encoded whole (`LineEncoder.encode_uniform`): one spool write. `times` are
    the records' times, a line each (a file opened for a line is named after its time)."""

    variant: str
    hour: int
    first_time: float
    data: bytes
    times: list[float]


class Group(NamedTuple):
    """The lines of one (variant, hour) and their records' times (a file is named after the time
    of its first record)."""

    first_time: float
    lines: list[Line]
    times: list[float]


#: A str as a JSON string, quotes included: byte for byte what msgspec writes for the same str
#: (checked for every code point in tests/test_encode.py), and on long text several times faster
#: (SIMD escaping). On short bodies msgspec is the faster of the two inside the encoder (both
#: measured in bench/README.md, "Stage by stage"), so `encode_uniform` picks by the length of a
#: batch's first body, from LONG_TEXT characters on.
escape_text = orjson.dumps
LONG_TEXT = 1024


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


class _NotUniform(Exception):
    """The batch is not uniform (`LineEncoder.encode_uniform`): encode it record by record."""


def _given_by_all(values: list[str | None]) -> list[str] | None:
    """`values` if every record gave one, None if none did; mixed is not uniform."""
    missing = values.count(None)
    if missing == len(values):
        return None
    if missing:
        raise _NotUniform
    return values  # type: ignore[return-value]


def _valid_inference_ids(ids: list[str]) -> bool:
    """Every id printable, none starting with a space (lengths are the decoder's)."""
    # After the printable check no id holds a newline, so "\n " marks an id starting with a space.
    return "".join(ids).isprintable() and ("\n" + "\n".join(ids)).find("\n ") < 0


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
        latest: float = MAX_EPOCH_S,
    ) -> tuple[dict[tuple[str, int], Group], int, int, int]:
        """Lines of `records` grouped by (variant, UTC hour), how many records were refused, how
        many had nothing to capture (no captured side present: never written as `{}`), and how
        many had a time past `latest` (refused: too far ahead of the daemon's clock).

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
        last_times: list[float] = []
        empty = future = 0
        last_second = -1
        ts = ""
        invalid = 0
        for r, new_id in zip(records, ids, strict=True):
            t = r.inference_time
            if not 0.0 <= t < MAX_EPOCH_S:  # also false for NaN
                invalid += 1
                continue
            if t > latest:
                future += 1
                continue
            variant = r.variant_name
            if variant is None:
                variant = default_variant
            elif not variant_ok(variant):
                invalid += 1
                continue
            # The metadata rules `prepare_record` (captured.client.record) applies in the client,
            # for peers that do not use it. Lengths are checked by the decoder already
            # (`frames.Record`); what it cannot check costs one None test per field.
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
            if inp is None and out is None:  # nothing to capture: never written as {} (counted)
                empty += 1
                continue
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
                    group = groups[key] = Group(t, [], [])
                last_variant, last_hour, last_lines, last_times = variant, hour, group.lines, group.times
            last_lines.append(line)
            last_times.append(t)
        return groups, invalid, empty, future

    def encode_uniform(
        self,
        records: Sequence[Record],
        default_variant: str,
        variant_ok: Callable[[str], bool],
        latest: float = MAX_EPOCH_S,
    ) -> Uniform | None:
        """The whole of `records` as JSON Lines in one piece when the batch is uniform, else None.

        Uniform: every time valid and in one UTC hour; one variant; each optional field (event
        id, inference id, custom attributes) given by every record or by none, and valid; each
        captured side present in every record or in none, with one content type; text bodies
        that are valid UTF-8. That is what one model server sends. Anything else returns None
        and goes through `group_lines` + `encode`, which this equals byte for byte
        (tests/test_encode.py checks it with Hypothesis).

        The work goes column by column, as C-level passes over the batch (comprehensions,
        `map`, `count`, `join`): the line is a template whose variable parts (bodies, ids,
        times) are JSON-encoded a column at a time and interleaved with the constant parts by
        strided list assignment. No struct per record: about twice as fast as `group_lines`.
        """
        n = len(records)
        if not n:
            return None
        times = [r.inference_time for r in records]
        lo = min(times)
        hi = max(times)
        total = sum(times)  # NaN if any time is NaN (min/max would skip it)
        if total != total or not (lo >= 0.0 and hi < MAX_EPOCH_S) or hi > latest:
            return None
        first_second = int(lo)
        last_second = int(hi)
        hour = first_second // 3600
        if last_second // 3600 != hour:
            return None
        encode = self._json_encoder.encode
        event_ids: list[str] | None = None
        inference_ids: list[str] | None = None
        attributes: list[str] | None = None
        variant = default_variant
        if [
            r
            for r in records
            if r.event_id is not None
            or r.inference_id is not None
            or r.custom_attributes is not None
            or r.variant_name is not None
        ]:  # one pass for the common case, where none of the four is given
            variants = [r.variant_name for r in records]
            if variants.count(variants[0]) != n:
                return None
            if variants[0] is not None:
                variant = variants[0]
                if not variant_ok(variant):
                    return None
            try:
                event_ids = _given_by_all([r.event_id for r in records])
                inference_ids = _given_by_all([r.inference_id for r in records])
                attributes = _given_by_all([r.custom_attributes for r in records])
            except _NotUniform:
                return None
            if inference_ids is not None and not _valid_inference_ids(inference_ids):
                return None
            if attributes is not None and not "".join(attributes).isascii():
                return None

        # The line as constant text around variable columns (one piece per record each).
        consts: list[bytes] = []
        columns: list[list[bytes]] = []
        text = b'{"captureData":{'
        sides = (
            (b'"endpointInput"', b"INPUT", [r.request for r in records] if self.capture_input else None),
            (b'"endpointOutput"', b"OUTPUT", [r.response for r in records] if self.capture_output else None),
        )
        comma = b""
        for key, mode, bodies in sides:
            if bodies is None:  # not captured
                continue
            if bodies[0] is None:
                if bodies.count(None) == n:  # captured, but no record has this side
                    continue
                return None
            if mode == b"INPUT":
                types = [r.request_content_type for r in records]
            else:
                types = [r.response_content_type for r in records]
            content_type = types[0]
            if types.count(content_type) != n:
                return None
            encoding = self.encoding_for(content_type)
            if encoding is BASE64:
                if None in bodies:
                    return None
                column = list(map(encode, bodies))  # msgspec writes bytes as base64 strings
            else:
                try:
                    texts = list(map(bytes.decode, bodies))  # type: ignore[arg-type]
                except (TypeError, UnicodeDecodeError):  # a None body, or not UTF-8 after all
                    return None
                # Two escapers, the same bytes: see `escape_text`.
                escape = escape_text if len(texts[0]) >= LONG_TEXT else encode
                column = list(map(escape, texts))
            consts.append(
                b'%s%s:{"observedContentType":%s,"mode":"%s","data":'
                % (text, comma + key, encode(content_type), mode)
            )
            columns.append(column)
            text = b',"encoding":"%s"}' % encoding.encode()
            comma = b","
        if not columns:  # no captured side in any record: `group_lines` counts them, writes none
            return None
        consts.append(text + b'},"eventMetadata":{"eventId":')
        if event_ids is None:
            columns.append(new_event_id_pieces(n))  # each with the comma after it
            sep = b""
        else:
            columns.append(list(map(encode, event_ids)))
            sep = b","
        for key, given in ((b"inferenceId", inference_ids), (b"customAttributes", attributes)):
            if given is not None:
                consts.append(b'%s"%s":' % (sep, key))
                columns.append(list(map(encode, given)))
                sep = b","
        text = sep + b'"inferenceTime":"'
        if first_second == last_second:
            text += self.time_string(first_second).encode()
        else:
            strings = {sec: self.time_string(sec).encode() for sec in set(map(int, times))}
            consts.append(text)
            columns.append(list(map(strings.__getitem__, map(int, times))))
            text = b""
        text += b'"},"eventVersion":"0"}\n'

        # Record i is consts[0] col0[i] consts[1] col1[i] ...; the text after the last column
        # joins the next record's first constant.
        k = len(columns)
        row: list[bytes] = []
        for c in consts:
            row += (c, b"")
        row[0] = text + consts[0]
        parts = row * n
        for j, column in enumerate(columns):
            parts[2 * j + 1 :: 2 * k] = column
        parts[0] = consts[0]
        parts.append(text)
        return Uniform(variant, hour, records[0].inference_time, b"".join(parts), times)

    def encode(self, lines: Iterable[Line]) -> bytes:
        """JSON Lines: one compact object per line, each followed by `\\n`."""
        return self._json_encoder.encode_lines(lines)
