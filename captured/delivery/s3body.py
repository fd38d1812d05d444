"""A part of a spool file as an HTTP request body, streamed from the file in 1 MiB reads.

Handing botocore the part as one `bytes` object cost three copies of every byte in the uploader
(aiohttp joins the headers to the body, the transport slices off what the socket took and
buffers the rest) and kept `max_concurrent_parts` whole parts in memory. This body is read
from the file a piece at a time as the connection takes it, so an upload holds about one piece
per part in flight. It is an aiohttp `Payload`, which aiobotocore passes through untouched; the
checksum is computed beforehand (`crc32_of`) and sent as a header, so botocore never reads it.
Imported by the uploader process only (it pulls in aiohttp).
"""

from __future__ import annotations

import base64
import os
import zlib

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from captured.errors import UploadError

CHUNK_BYTES = 1024 * 1024


#: Spool files are opened without following a symbolic link (one planted in the spool must never
#: make the uploader read, and upload, a file elsewhere).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def _short(path: str) -> UploadError:
    # The file ended before the part did: it changed after it was sealed. No retry mends that.
    return UploadError(cause="local_file", retryable=False, message=f"{path} is shorter than expected")


def crc32_of(path: str, offset: int, length: int) -> str:
    """CRC32 of `length` bytes of `path` from `offset`, base64 as S3 writes it (blocking)."""
    crc = 0
    fd = os.open(path, _READ_FLAGS)
    try:
        end = offset + length
        while offset < end:
            chunk = os.pread(fd, min(CHUNK_BYTES, end - offset), offset)
            if not chunk:
                raise _short(path)
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
    finally:
        os.close(fd)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class FilePart(Payload):
    """`length` bytes of `path` from `offset`; can be sent any number of times (retries)."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._offset = offset
        self._length = length
        self._size = length
        self._pos = 0

    # File-like enough for botocore: it checks for `read`, takes `len()` as the Content-Length
    # and rewinds with `seek(0)` before a retry. `write_with_length` always sends the whole part.

    def __len__(self) -> int:
        return self._length

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        n = self._length - self._pos if size < 0 else min(size, self._length - self._pos)
        fd = os.open(self._path, _READ_FLAGS)
        try:
            data = os.pread(fd, n, self._offset + self._pos)
        finally:
            os.close(fd)
        self._pos += len(data)
        return data

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file part is bytes, not text")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        left = self._length if content_length is None else min(self._length, content_length)
        offset = self._offset
        fd = os.open(self._path, _READ_FLAGS)
        try:
            while left > 0:
                # A blocking read of at most 1 MiB, mostly from the page cache: this loop runs in
                # the uploader process, where nothing but uploads waits on it.
                chunk = os.pread(fd, min(CHUNK_BYTES, left), offset)
                if not chunk:
                    raise _short(self._path)
                await writer.write(chunk)
                offset += len(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"FilePart({self._path!r}, offset={self._offset}, length={self._length})"
