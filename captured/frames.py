"""The wire protocol between `CaptureClient` and the daemon.

A connection is a stream Unix socket carrying frames in both directions. Every frame is an
8-byte header followed by a payload::

    offset  size  field
    0       2     magic    b"CP"
    2       1     version  PROTOCOL_VERSION (1); the layout of these 8 bytes never changes
    3       1     kind     Kind below
    4       4     length   payload length in bytes, unsigned big-endian, <= max_frame_bytes

Payloads are MessagePack (msgspec), except ERROR whose payload is plain UTF-8 text so that a
peer of any version can read why it was refused.

client -> daemon
    BATCH   array of records; each record is an array (see `Record`)
    FLUSH   [seq]: "tell me when you have processed everything I sent before this"
    STATUS  [] : ask for the daemon's status (used by `captured status`)
daemon -> client
    ACK     [seq, records]: every record sent on this connection before FLUSH `seq` has been
            processed (written to the spool or dropped under a counted reason); `records` is
            how many records the daemon has taken from this connection so far
    STATUS_REPLY  a map, the same document `captured status --json` prints
    ERROR   UTF-8 text; the daemon closes the connection after sending it

A frame with a wrong magic, another version, an unknown kind, a length above the maximum or a
payload that does not decode closes that connection (counted by reason); other connections are
not affected. Records inside a BATCH that do not match the schema are refused one by one
(counted as `invalid_record`) while the valid ones in the same batch are kept.
"""

from __future__ import annotations

import enum
import struct
import sys
from typing import Annotated, Any

import msgspec

MAGIC = b"CP"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">2sBBI")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


class Kind(enum.IntEnum):
    BATCH = 1
    FLUSH = 2
    ACK = 3
    STATUS = 4
    STATUS_REPLY = 5
    ERROR = 6


_KINDS = frozenset(int(k) for k in Kind)

# A SageMaker inference id: 1..64 characters. Custom attributes: at most 1024 characters.
InferenceId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
CustomAttributes = Annotated[str, msgspec.Meta(max_length=1024)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ContentType = Annotated[str, msgspec.Meta(max_length=1024)]
VariantName = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]


class Record(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One request/response pair, as the client sends it (a MessagePack array, in this order).

    A body is MessagePack bin (the caller's `str` encoded as UTF-8), nil when absent.
    `inference_time` is epoch seconds (float).
    """

    request: bytes | None
    response: bytes | None
    request_content_type: ContentType | None
    response_content_type: ContentType | None
    inference_time: float
    event_id: EventId | None = None
    inference_id: InferenceId | None = None
    custom_attributes: CustomAttributes | None = None
    variant_name: VariantName | None = None


class Ack(msgspec.Struct, array_like=True, gc=False, frozen=True):
    seq: int
    records: int


class Flush(msgspec.Struct, array_like=True, gc=False, frozen=True):
    seq: int


class ProtocolError(Exception):
    """The peer broke the protocol; `reason` is the counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(list[Record])
raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
record_decoder = msgspec.msgpack.Decoder(Record)
ack_decoder = msgspec.msgpack.Decoder(Ack)
flush_decoder = msgspec.msgpack.Decoder(Flush)
any_decoder = msgspec.msgpack.Decoder()


def frame(kind: Kind, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(payload)) + payload


def encode_frame(kind: Kind, obj: Any) -> bytes:
    return frame(kind, _encoder.encode(obj))


def error_frame(message: str) -> bytes:
    return frame(Kind.ERROR, message.encode("utf-8", "replace"))


def parse_header(buf: bytes | bytearray | memoryview, max_frame_bytes: int) -> tuple[int, int]:
    """Validate the 8-byte header at the start of `buf`; return (kind, payload length)."""
    magic, version, kind, length = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError("bad_header", "not a captured frame (bad magic)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version} is not supported; this peer speaks version {PROTOCOL_VERSION}",
        )
    if kind not in _KINDS:
        raise ProtocolError("unknown_kind", f"unknown frame kind {kind}")
    if length > max_frame_bytes:
        raise ProtocolError(
            "frame_too_large", f"frame of {length} bytes exceeds the maximum {max_frame_bytes}"
        )
    return kind, length


class FrameReader:
    """Incremental frame parser for a byte stream: feed bytes, get whole frames.

    Buffers at most one incomplete frame (bounded by `max_frame_bytes` + one read).
    """

    __slots__ = ("_buf", "_error", "_max", "_need")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes
        # Bytes the buffered partial frame needs before parsing is worth trying again: keeps a
        # large frame arriving in many reads from being re-scanned (and copied) per read.
        self._need = 0
        self._error: BaseException | None = None

    def check(self) -> None:
        """Raise the `ProtocolError` found after the frames the last `feed` returned, if any."""
        if self._error is not None:
            raise self._error

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, memoryview]]:
        """Append `data`; return the complete frames as (kind, payload) in order.

        The payload views stay valid until the next call to `feed`. A bad header after some
        whole frames is raised by `check()` (or the next `feed`), so those frames still count.
        """
        self.check()
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            # No copy: `buf` is never changed again (what is left of it goes to a new buffer
            # below), so the payload views handed out stay valid.
            view = memoryview(buf)
        else:
            view = memoryview(data)
        frames: list[tuple[int, memoryview]] = []
        pos = 0
        end = len(view)
        need = HEADER_SIZE
        while end - pos >= HEADER_SIZE:
            try:
                kind, length = parse_header(view[pos : pos + HEADER_SIZE], self._max)
            except ProtocolError:
                if not frames:
                    raise
                # The frames before the bad header are whole and valid: hand them out first;
                # the error is raised by the next call (`check` or `feed`).
                self._error = sys.exc_info()[1]
                return frames
            stop = pos + HEADER_SIZE + length
            if stop > end:
                need = HEADER_SIZE + length
                break
            frames.append((kind, view[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            self._buf = bytearray(view[pos:])
            self._need = need
        elif buf:
            self._buf = bytearray()
            self._need = 0
        return frames
