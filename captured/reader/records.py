"""One stored capture line -> a typed `Capture`, its data decoded per its encoding (pure, no I/O).

A line is SageMaker's record (spec section 3, ours and SageMaker's alike)::

    {"captureData":{"endpointInput":{...},"endpointOutput":{...}},
     "eventMetadata":{"eventId":...,"inferenceId":...,"customAttributes":...,"inferenceTime":...},
     "eventVersion":"0"}

`data` is the body as text for `CSV` and `JSON`, standard base64 for `BASE64`. `Side.data` is
always the body's bytes; `binary` says a BASE64 body is not valid UTF-8 text.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

import msgspec

CSV = "CSV"
JSON = "JSON"
BASE64 = "BASE64"
ENCODINGS = (CSV, JSON, BASE64)


class StoredSide(msgspec.Struct, frozen=True):
    """`endpointInput` / `endpointOutput` as stored."""

    observedContentType: str | None
    mode: str
    data: str
    encoding: str


class StoredCaptureData(msgspec.Struct, frozen=True):
    endpointInput: StoredSide | None = None
    endpointOutput: StoredSide | None = None


class StoredMetadata(msgspec.Struct, frozen=True):
    eventId: str
    inferenceTime: str
    inferenceId: str | None = None
    customAttributes: str | None = None


class StoredLine(msgspec.Struct, frozen=True):
    captureData: StoredCaptureData
    eventMetadata: StoredMetadata
    eventVersion: str = "0"


_decoder = msgspec.json.Decoder(StoredLine)


class Side(msgspec.Struct, frozen=True):
    """One side of a capture, decoded."""

    content_type: str | None
    encoding: str
    #: The body's bytes (BASE64 decoded).
    data: bytes
    #: A BASE64 body that is not valid UTF-8.
    binary: bool

    def text(self) -> str:
        """The body as text (UTF-8); UnicodeDecodeError for a binary body."""
        return self.data.decode("utf-8")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.data)


class Capture(msgspec.Struct, frozen=True):
    """One captured request/response, where it came from, and its sides."""

    endpoint: str
    variant: str
    #: The object key (S3) or the path (local) it was read from.
    key: str
    #: 1-based line number in that file.
    line: int
    event_id: str
    inference_time: dt.datetime
    inference_id: str | None
    custom_attributes: str | None
    input: Side | None
    output: Side | None


class LineError(ValueError):
    """A line that is not a valid capture record; the message says why."""


def parse_time(text: str) -> dt.datetime:
    """`2021-05-18T00:29:02Z` (SageMaker's form; fractions and offsets accepted) -> aware UTC."""
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise LineError(f"inferenceTime {text!r} is not an ISO 8601 time") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def decode_side(side: StoredSide) -> Side:
    """A stored side with its data decoded per its encoding."""
    if side.encoding == BASE64:
        try:
            data = base64.b64decode(side.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LineError(f"BASE64 data that is not base64: {exc}") from exc
        try:
            data.decode("utf-8")
            binary = False
        except UnicodeDecodeError:
            binary = True
        return Side(side.observedContentType, side.encoding, data, binary)
    if side.encoding not in (CSV, JSON):
        raise LineError(f"unknown encoding {side.encoding!r}")
    return Side(side.observedContentType, side.encoding, side.data.encode("utf-8", "surrogatepass"), False)


def parse_stored(line: bytes) -> StoredLine:
    """The record as stored; `LineError` when the line is not one."""
    if not line.strip():
        raise LineError("an empty line")
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise LineError(f"not a capture record: {exc}") from exc


def parse_line(line: bytes, endpoint: str, variant: str, key: str, number: int) -> Capture:
    """A stored line as a `Capture`; `LineError` when it is not a valid capture record."""
    stored = parse_stored(line)
    meta = stored.eventMetadata
    data = stored.captureData
    return Capture(
        endpoint=endpoint,
        variant=variant,
        key=key,
        line=number,
        event_id=meta.eventId,
        inference_time=parse_time(meta.inferenceTime),
        inference_id=meta.inferenceId,
        custom_attributes=meta.customAttributes,
        input=decode_side(data.endpointInput) if data.endpointInput is not None else None,
        output=decode_side(data.endpointOutput) if data.endpointOutput is not None else None,
    )


def side_document(side: Side) -> dict[str, Any]:
    """A side as `captured read` prints it: text as stored, binary bodies as base64."""
    doc: dict[str, Any] = {"contentType": side.content_type, "encoding": side.encoding}
    if side.binary:
        doc["data"] = base64.b64encode(side.data).decode("ascii")
        doc["binary"] = True
    else:
        doc["data"] = side.data.decode("utf-8", "surrogatepass")
    return doc


def document(c: Capture) -> dict[str, Any]:
    """A capture as `captured read` prints it (one JSON object per record)."""
    doc: dict[str, Any] = {
        "endpoint": c.endpoint,
        "variant": c.variant,
        "key": c.key,
        "eventId": c.event_id,
        "inferenceTime": c.inference_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if c.inference_id is not None:
        doc["inferenceId"] = c.inference_id
    if c.custom_attributes is not None:
        doc["customAttributes"] = c.custom_attributes
    if c.input is not None:
        doc["input"] = side_document(c.input)
    if c.output is not None:
        doc["output"] = side_document(c.output)
    return doc
