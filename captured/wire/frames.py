"""The wire protocol between `CaptureClient` and the daemon.

A connection is a stream Unix socket carrying frames in both directions. Every frame is an
8-byte header followed by a payload::

    offset  size  field
    0       2     magic    b"CP"
    2       1     version  1 or 2 (see below); the layout of these 8 bytes never changes
    3       1     kind     Kind below
    4       4     length   payload length in bytes, unsigned big-endian, <= max_frame_bytes

Payloads are MessagePack (msgspec), except ERROR whose payload is plain UTF-8 text (always
sent with version 1 in its header) so that a peer of any version can read why it was refused.

Version 1 (at most once): a connection that does not start with HELLO.

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

Version 2 (nothing lost, nothing twice): a connection whose first frame is HELLO; every frame
both ways then carries version 2 in its header (an older daemon refuses HELLO with an ERROR
saying which version it speaks, and the client falls back to version 1).

client -> daemon
    HELLO   [session, window]: `session` is 16 random bytes naming this client (new in every
            process); `window` is the client's buffer size in bytes (the daemon acknowledges
            before a client has that much unacknowledged)
    BATCH   8 bytes: the session sequence number of the frame's first record (unsigned
            big-endian; records are numbered 0, 1, 2, ... across the session's connections),
            then the MessagePack array of records as in version 1
    FLUSH   [seq]: acknowledge now
daemon -> client
    ACK     [seq, next]: `next` is the first sequence number of the session the daemon has not
            taken; every record below it is written to the spool (and noted in its journal, so
            it survives a crash of the daemon) or dropped under a counted reason. Sent in reply
            to HELLO and FLUSH (`seq` echoes the FLUSH, 0 otherwise), after at most
            `ACK_INTERVAL_S` or a quarter window of new records, and before the daemon closes
            the connection. A client keeps every record until an ACK covers it and, after a
            reconnect, sends again what is not covered; the daemon skips records below `next`
            (counted `resent`), so nothing is written twice.

A frame with a wrong magic, another version, an unknown kind, a length above the maximum or a
payload that does not decode closes that connection (counted by reason); other connections are
not affected. Records inside a BATCH that do not match the schema are refused one by one
(counted as `invalid_record`) while the valid ones in the same batch are kept.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Any

import msgspec

# Part of the wire contract: both sides catch `frames.ProtocolError`.
from captured.errors import ProtocolError as ProtocolError
from captured.wire import rules

MAGIC = b"CP"
#: The newest version spoken; the daemon serves every version in SUPPORTED_VERSIONS.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
HEADER = struct.Struct(">2sBBI")
#: Version 2 BATCH payloads start with the first record's sequence number.
BATCH_SEQ = struct.Struct(">Q")
#: Version 2: the daemon acknowledges at least this often while records arrive.
ACK_INTERVAL_S = 0.1
#: Refusals about one frame (the ERROR text starts with the reason): the client drops that frame
#: instead of sending it again forever; the ACK before the ERROR covers every frame before it.
FRAME_REFUSALS = ("frame_too_large", "bad_payload", "internal_error")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


class Kind(enum.IntEnum):
    BATCH = 1
    FLUSH = 2
    ACK = 3
    STATUS = 4
    STATUS_REPLY = 5
    ERROR = 6
    HELLO = 7


_KINDS = frozenset(int(k) for k in Kind)

# A SageMaker inference id: 1..64 characters. Custom attributes: at most 1024 characters.
InferenceId = Annotated[str, msgspec.Meta(min_length=1, max_length=rules.MAX_INFERENCE_ID)]
CustomAttributes = Annotated[str, msgspec.Meta(max_length=rules.MAX_CUSTOM_ATTRIBUTES)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=rules.MAX_EVENT_ID)]
ContentType = Annotated[str, msgspec.Meta(max_length=rules.MAX_CONTENT_TYPE)]
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
    #: Which of the daemon's endpoints the capture is for (None: its default endpoint). A client
    #: leaves it out of the array when None, so daemons before 0.3 still read its records.
    endpoint_name: VariantName | None = None


class Ack(msgspec.Struct, array_like=True, gc=False, frozen=True):
    seq: int
    records: int


class Flush(msgspec.Struct, array_like=True, gc=False, frozen=True):
    seq: int


class Hello(msgspec.Struct, array_like=True, gc=False, frozen=True):
    session: Annotated[bytes, msgspec.Meta(min_length=8, max_length=64)]
    window: Annotated[int, msgspec.Meta(ge=0)]


_encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(list[Record])
raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
record_decoder = msgspec.msgpack.Decoder(Record)
ack_decoder = msgspec.msgpack.Decoder(Ack)
flush_decoder = msgspec.msgpack.Decoder(Flush)
hello_decoder = msgspec.msgpack.Decoder(Hello)
any_decoder = msgspec.msgpack.Decoder()


def frame(kind: Kind, payload: bytes, version: int = 1) -> bytes:
    return HEADER.pack(MAGIC, version, kind, len(payload)) + payload


def encode_frame(kind: Kind, obj: Any, version: int = 1) -> bytes:
    return frame(kind, _encoder.encode(obj), version)


def error_frame(message: str) -> bytes:
    """ERROR always goes out as version 1: a peer of any version can read it."""
    return frame(Kind.ERROR, message.encode("utf-8", "replace"))


def batch_frame_v2(first_seq: int, payload: bytes) -> bytes:
    """A version 2 BATCH: header, the first record's sequence number, the records."""
    head = HEADER.pack(MAGIC, 2, Kind.BATCH, BATCH_SEQ.size + len(payload))
    return head + BATCH_SEQ.pack(first_seq) + payload


def parse_header(buf: bytes | bytearray | memoryview, max_frame_bytes: int) -> tuple[int, int]:
    """Validate the 8-byte header at the start of `buf`; return (kind, payload length)."""
    magic, version, kind, length = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(reason="bad_header", message="not a captured frame (bad magic)")
    if version != 1 and version != 2:  # SUPPORTED_VERSIONS, spelled out: this runs per frame
        raise ProtocolError(
            reason="unsupported_version",
            message=f"protocol version {version} is not supported; this peer speaks versions 1 and 2",
        )
    if kind not in _KINDS:
        raise ProtocolError(reason="unknown_kind", message=f"unknown frame kind {kind}")
    if length > max_frame_bytes:
        raise ProtocolError(
            reason="frame_too_large", message=f"frame of {length} bytes exceeds the maximum {max_frame_bytes}"
        )
    return kind, length


def cut_frames(
    view: memoryview, max_frame_bytes: int
) -> tuple[list[tuple[int, memoryview]], int, int, ProtocolError | None]:
    """The whole frames at the start of `view` as (kind, payload view), the offset after them,
    the size the partial frame after them will have (HEADER_SIZE while its header is
    incomplete), and the error of a bad header found after at least one whole frame.

    A bad header before any whole frame raises `ProtocolError`. After whole frames it is
    returned instead, so those frames still count before the connection is refused.
    """
    frames: list[tuple[int, memoryview]] = []
    pos = 0
    end = len(view)
    need = HEADER_SIZE
    while end - pos >= HEADER_SIZE:
        try:
            kind, length = parse_header(view[pos : pos + HEADER_SIZE], max_frame_bytes)
        except ProtocolError as exc:
            if not frames:
                raise
            return frames, pos, need, exc
        stop = pos + HEADER_SIZE + length
        if stop > end:
            need = HEADER_SIZE + length
            break
        frames.append((kind, view[pos + HEADER_SIZE : stop]))
        pos = stop
    return frames, pos, need, None


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
        frames, pos, need, self._error = cut_frames(view, self._max)
        end = len(view)
        if pos < end:
            self._buf = bytearray(view[pos:])
            self._need = need
        elif buf:
            self._buf = bytearray()
            self._need = 0
        return frames


#: What one read may bring: the size of the shared read buffer of `FrameBuffer`.
READ_SIZE = 256 * 1024
#: Own buffers of finished frames kept for the next frame of any connection (`FrameBuffer`).
SPARE_BUFFERS = 8


class FrameBuffer:
    """The daemon's frame parser, for `asyncio.BufferedProtocol`: reads land where they are parsed.

    With no frame under way, a read goes into `scratch`, a buffer all connections share (the
    event loop reads one connection at a time, and its frames are processed before the next
    read); the whole frames in it are parsed in place. The part of a frame still arriving is
    copied once, into an own buffer of this connection, and the rest of that frame is read
    straight after it. So a byte is copied at most once before the msgpack decode; with a
    `Protocol` every read became a new `bytes` and a frame spanning reads was appended to a
    `bytearray` as well. (A client's 256 KiB frames usually span reads: the kernel queues about
    200 KiB of a Unix stream at a time.)

    The own buffer grows with what has arrived (at most READ_SIZE past it, doubling), never to
    a frame's announced size at once, so a header claiming 16 MiB costs nothing until the bytes
    come; its size is what `buffered` reports for the memory budget. When the frame is done it
    goes to `spare`, a list all connections share (at most SPARE_BUFFERS, none over
    4 * READ_SIZE), so the next partial frame of any connection reuses it instead of allocating:
    between frames a connection holds nothing.

    The views handed out stay valid until the next `get_buffer` of any connection sharing
    `scratch` and `spare`: the daemon processes them before it reads again.
    """

    __slots__ = ("_error", "_held", "_into_own", "_max", "_need", "_own", "_scratch", "_spare")

    def __init__(self, max_frame_bytes: int, scratch: bytearray, spare: list[bytearray]) -> None:
        self._max = max_frame_bytes
        self._scratch = scratch
        self._spare = spare
        self._own: bytearray | None = None
        self._held = 0  # bytes of the frame under way, at the start of `_own`
        self._need = HEADER_SIZE  # its size once its header is in; HEADER_SIZE until then
        self._into_own = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Memory held for a frame that has not arrived whole: the own buffer's size (the bytes
        arrived plus the room reserved for the next reads), 0 between frames."""
        return len(self._own) if self._own is not None else 0

    def check(self) -> None:
        """Raise the `ProtocolError` found after the frames the last read gave, if any."""
        if self._error is not None:
            raise self._error

    def get_buffer(self) -> memoryview:
        """Where the next read goes (`BufferedProtocol.get_buffer`)."""
        if self._held == 0:
            self._into_own = False
            return memoryview(self._scratch)
        self._into_own = True
        own = self._reserve(self._need, self._held + 1)
        return memoryview(own)[self._held : min(self._need, len(own))]

    def buffer_updated(self, nbytes: int) -> list[tuple[int, memoryview]]:
        """The whole frames the read of `nbytes` completed, as (kind, payload view).

        A bad header after whole frames is raised by `check()`; before any, here.
        """
        self.check()
        if not self._into_own:
            return self._take(memoryview(self._scratch)[:nbytes])
        self._held += nbytes
        if self._held < self._need:
            return []
        own = self._own
        assert own is not None
        if self._need == HEADER_SIZE:  # the header is complete: now the frame's size is known
            _, length = parse_header(own, self._max)
            self._need = HEADER_SIZE + length
            if self._held < self._need:
                return []
        # The frame is whole (reads into the own buffer stop at its end).
        frames, _, _, _ = cut_frames(memoryview(own)[: self._held], self._max)
        self._held = 0
        self._need = HEADER_SIZE
        self._own = None
        if len(own) <= 4 * READ_SIZE and len(self._spare) < SPARE_BUFFERS:
            self._spare.append(own)
        return frames

    def _take(self, view: memoryview) -> list[tuple[int, memoryview]]:
        """Whole frames from a read into the scratch buffer; keep the start of the next one."""
        frames, pos, need, self._error = cut_frames(view, self._max)
        rest = len(view) - pos
        if rest and self._error is None:
            own = self._reserve(need, rest)
            own[:rest] = view[pos:]
            self._held = rest
            self._need = need
        return frames

    def _reserve(self, need: int, at_least: int) -> bytearray:
        """The own buffer, with room for at least `at_least` bytes. When it has to grow: to the
        frame's size `need` or READ_SIZE past `at_least` (at least doubling), whichever is less;
        a spare buffer of that size serves if there is one."""
        own = self._own
        if own is None and self._spare:
            own = self._own = self._spare.pop()
        if own is not None and len(own) >= at_least:
            return own
        cap = max(min(need, max(at_least + READ_SIZE, 2 * len(own) if own is not None else 0)), at_least)
        new = bytearray(max(cap, HEADER_SIZE))
        if own is not None and self._held:
            new[: self._held] = own[: self._held]
        self._own = new
        return new
