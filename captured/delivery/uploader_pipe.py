"""The pipe between the daemon and its S3 uploader process: the messages and their framing.

MessagePack with a 4-byte big-endian length, on the child's stdin (`Init`, then requests) and on
its original stdout (`Ready`, then one `Done` per request, matched by `id`).
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from captured.errors import UploadError
from captured.service.settings import S3Config

LEN = struct.Struct(">I")


class Init(msgspec.Struct, tag=True):
    uri: str
    s3: S3Config
    kms_key_id: str | None
    log_level: str


class Ready(msgspec.Struct, tag=True):
    error: str | None = None


class Put(msgspec.Struct, tag=True):
    id: int
    path: str
    key: str
    retry: bool = False
    #: The destination (`s3://bucket[/prefix]`) and its SSE-KMS key: one process serves every
    #: endpoint's destination.
    uri: str = ""
    kms_key_id: str | None = None


class Cancel(msgspec.Struct, tag=True):
    id: int


class ListStale(msgspec.Struct, tag=True):
    id: int
    own_prefix: str
    older_than_s: float
    uri: str = ""
    kms_key_id: str | None = None


class Abort(msgspec.Struct, tag=True):
    id: int
    uploads: list[tuple[str, str]]
    uri: str = ""
    kms_key_id: str | None = None


class Close(msgspec.Struct, tag=True):
    pass


class Done(msgspec.Struct, tag=True):
    id: int
    count: int = 0
    uploads: list[tuple[str, str]] = []
    #: Set when the request failed: the `UploadError`'s cause and retryable flag, and its message
    #: (the daemon raises the same `UploadError` again).
    cause: str | None = None
    retryable: bool = True
    message: str = ""

    def error(self) -> UploadError | None:
        """The failure this reply reports, to raise in the daemon; None for a success."""
        if self.cause is None:
            return None
        return UploadError(cause=self.cause, retryable=self.retryable, message=self.message)


Request = Put | Cancel | ListStale | Abort | Close
Reply = Ready | Done

_encoder = msgspec.msgpack.Encoder()
init_decoder = msgspec.msgpack.Decoder(Init)
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def pack(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return LEN.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One message's body, or None at a clean end of stream."""
    try:
        head = await reader.readexactly(LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return await reader.readexactly(LEN.unpack(head)[0])
