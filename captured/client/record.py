"""One capture as the caller hands it -> the wire tuple of `frames.Record`, validated.

Shared by `CaptureClient` and `AsyncCaptureClient`. Only programming errors raise (`TypeError`,
`ValueError`); nothing here touches I/O.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

import msgspec

from captured.wire import frames
from captured.wire.rules import (
    MAX_CONTENT_TYPE,
    MAX_CUSTOM_ATTRIBUTES,
    MAX_EPOCH_S,
    MAX_EVENT_ID,
    MAX_INFERENCE_ID,
    valid_name,
)

Body = bytes | bytearray | memoryview | str | None
RecordTuple = tuple[Any, ...]

DEFAULT_BUFFER_BYTES = 8 * 1024 * 1024
DEFAULT_BATCH_BYTES = 256 * 1024
#: How long a client lets records gather before it sends them (unless a batch fills first).
DEFAULT_LINGER_S = 0.05

# Client-side drop reasons.
BUFFER_FULL = "buffer_full"
CLOSED = "closed"
REJECTED = "rejected_by_daemon"

#: Fixed per-record overhead in the buffer accounting (tuple, time, MessagePack framing).
RECORD_OVERHEAD = 64


def check_options(max_body_bytes: int, linger_s: float) -> None:
    """A client's options that no daemon could serve raise at construction (both drivers)."""
    if max_body_bytes * 2 + 65536 > frames.DEFAULT_MAX_FRAME_BYTES:
        raise ValueError("max_body_bytes is too large for the daemon's maximum frame size")
    if not 0.0 <= linger_s <= 10.0:
        raise ValueError("linger_s must be 0..10 seconds")


def _body(value: Body, name: str, max_bytes: int) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        body = value
    elif isinstance(value, str):
        # Lone surrogates cannot be UTF-8: keep their bytes; the daemon then writes BASE64.
        body = value.encode("utf-8", "surrogatepass")
    elif isinstance(value, bytearray | memoryview):
        body = bytes(value)  # the caller may reuse its buffer after we return
    else:
        raise TypeError(f"{name} must be bytes, str or None, not {type(value).__name__}")
    if len(body) > max_bytes:
        raise ValueError(f"{name} is {len(body)} bytes; the maximum is {max_bytes}")
    return body


def _optional_str(value: object, name: str, max_len: int) -> int:
    if value is None:
        return 0
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str or None, not {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters; the maximum is {max_len}")
    return len(value)


def _epoch(value: object) -> float:
    if value is None:
        return time.time()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:  # SageMaker times are UTC; a naive datetime is taken as UTC
            value = value.replace(tzinfo=_dt.UTC)
        t = value.timestamp()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        t = float(value)
    else:
        raise TypeError(
            f"inference_time must be a datetime, epoch seconds or None, not {type(value).__name__}"
        )
    if not 0.0 <= t < MAX_EPOCH_S:
        raise ValueError(f"inference_time {value!r} is outside years 1970..9999")
    return t


def prepare_record(
    request_body: Body,
    response_body: Body,
    request_content_type: str | None,
    response_content_type: str | None,
    inference_id: str | None,
    custom_attributes: str | None,
    variant_name: str | None,
    event_id: str | None,
    inference_time: object,
    max_body_bytes: int,
    endpoint_name: str | None = None,
    default_endpoint: str | None = None,
) -> tuple[RecordTuple, int]:
    """Validate one capture; return the wire tuple (see `frames.Record`) and its buffer size.

    `endpoint_name` is the call's (checked here), `default_endpoint` the client's (checked once,
    by `check_endpoint`, when the client was made).
    """
    if (
        type(request_body) is bytes
        and type(response_body) is bytes
        and type(request_content_type) is str
        and type(response_content_type) is str
        and inference_time is None
        and event_id is None
        and inference_id is None
        and custom_attributes is None
        and variant_name is None
        and endpoint_name is None
    ):
        # The common call (two bytes bodies, content types, nothing else), checked in one place:
        # a model server calls this once per request, often with cold caches, so every function
        # call saved shows (bench/paced.py).
        size = len(request_body) + len(response_body)
        if (
            len(request_body) <= max_body_bytes
            and len(response_body) <= max_body_bytes
            and len(request_content_type) <= MAX_CONTENT_TYPE
            and len(response_content_type) <= MAX_CONTENT_TYPE
        ):
            size += RECORD_OVERHEAD + len(request_content_type) + len(response_content_type)
            now = time.time()
            if default_endpoint is None:
                return (request_body, response_body, request_content_type, response_content_type, now), size
            head = (request_body, response_body, request_content_type, response_content_type, now)
            return (*head, None, None, None, None, default_endpoint), size + len(default_endpoint)
    req = _body(request_body, "request_body", max_body_bytes)
    resp = _body(response_body, "response_body", max_body_bytes)
    size = RECORD_OVERHEAD + (len(req) if req is not None else 0) + (len(resp) if resp is not None else 0)
    size += _optional_str(request_content_type, "request_content_type", MAX_CONTENT_TYPE)
    size += _optional_str(response_content_type, "response_content_type", MAX_CONTENT_TYPE)
    if inference_id is not None:
        size += _optional_str(inference_id, "inference_id", MAX_INFERENCE_ID)
        if not inference_id or not inference_id.isprintable() or inference_id[0] == " ":
            raise ValueError("inference_id must be 1..64 printable characters, the first not a space")
    if custom_attributes is not None:
        size += _optional_str(custom_attributes, "custom_attributes", MAX_CUSTOM_ATTRIBUTES)
        if not custom_attributes.isascii():
            raise ValueError("custom_attributes must be ASCII (at most 1024 characters)")
    if variant_name is not None and not valid_name(variant_name):
        raise ValueError(f"variant_name {variant_name!r} does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}}")
    if endpoint_name is not None:
        check_endpoint(endpoint_name)
    else:
        endpoint_name = default_endpoint
    if event_id is not None:
        size += _optional_str(event_id, "event_id", MAX_EVENT_ID)
        if not event_id:
            raise ValueError("event_id must not be empty")
    rec = (
        req,
        resp,
        request_content_type,
        response_content_type,
        _epoch(inference_time),
        event_id,
        inference_id,
        custom_attributes,
        variant_name,
    )
    if endpoint_name is not None:
        return (*rec, endpoint_name), size + len(endpoint_name)
    return rec, size


def check_endpoint(endpoint_name: str | None) -> None:
    """An endpoint name a client may send: SageMaker's name pattern (it becomes a path component)."""
    if endpoint_name is not None and (type(endpoint_name) is not str or not valid_name(endpoint_name)):
        raise ValueError(f"endpoint_name {endpoint_name!r} does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}}")


def batch_frames(records: list[RecordTuple], sizes: list[int], batch_bytes: int) -> list[tuple[bytes, int]]:
    """Encode records into BATCH frames of at most about `batch_bytes` each: [(frame, n_records)].

    A frame is closed before a record that would take it past `batch_bytes`, so no frame is
    larger than `batch_bytes` or one record, whichever is larger (always below the daemon's
    smallest allowed maximum frame).
    """
    out: list[tuple[bytes, int]] = []
    start = 0
    acc = 0
    encode = _encoder.encode
    for i, size in enumerate(sizes):
        if acc and acc + size > batch_bytes:
            out.append((frames.frame(frames.Kind.BATCH, encode(records[start:i])), i - start))
            start = i
            acc = 0
        acc += size
    if start < len(records):
        out.append((frames.frame(frames.Kind.BATCH, encode(records[start:])), len(records) - start))
    return out


_encoder = msgspec.msgpack.Encoder()
