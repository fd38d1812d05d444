"""zstd compression of sealed spool files: `X.jsonl` -> `X.jsonl.zst`, one frame, crash-safe.

With `[delivery] compression = "zstd"` each sealed spool file `X.jsonl` is delivered as the object
`X.jsonl.zst`: ONE zstd frame whose decompressed content is exactly the bytes of the plain file,
so `zstd -d`, DuckDB's `read_json` and anything else that reads `.zst` read it unchanged.

Design:

* Plain synchronous code. Compression costs CPU seconds per GB, so it must run off the event loop
  (in a worker thread, e.g. `asyncio.to_thread`, or in the uploader subprocess). zstd runs in the
  calling thread (no zstd worker threads), which is why `time.thread_time()` differences measure
  all the CPU it spent (`CompressResult.cpu_s`).
* Streaming: the file goes through the compressor `CHUNK` bytes at a time, so memory stays
  bounded (a few MiB) for files of any size. The frame header carries the content size (the size
  of the source when it was opened) and the frame ends with a checksum of the content, so a torn
  or corrupt object fails on decompression instead of yielding silently wrong lines. If the
  source changes size while it is read, zstd refuses to end the frame ("Src size is incorrect")
  and `compress_file` fails: a sealed file must not change, and if it does, no object is made.
* Crash safety: the plain sealed file stays the source of truth until delivery has finished; this
  module never touches it. `compress_file` creates the destination exclusively (an existing one
  is an error: the caller removes leftovers first), fsyncs it before returning and removes it on
  any failure. A crash mid-way can still leave a partial `.zst` behind: `check_file` recognises
  it (truncated frame, bad checksum, or not zstd at all), and the caller deletes it and
  compresses again from the plain file. (Making the new name itself durable, by an fsync of the
  directory, is the caller's business, as is renaming, if it wants one.)
* Neither path is followed if it is a symlink (`O_NOFOLLOW`): the spool directory is the daemon's,
  and a link planted in it must not make the daemon read or write elsewhere.

`RatioEstimate` learns how well the data compresses, so that the spool may let a plain file grow
beyond `max_file_bytes` while the compressed object stays within it (see its docstring).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import time

import msgspec
import zstandard

from captured.daemon import spool

#: Suffix of a compressed object: `X.jsonl` is delivered as `X.jsonl.zst`.
ZST = spool.ZST

#: Bytes read from the source (and written to the destination) at a time.
CHUNK = 1 << 20
#: Compressed bytes fed to the decompressor at a time by `check_file`. Small, because the output
#: of one feed is held in memory whole: about `CHECK_FEED` times the ratio (~40 KiB for capture
#: lines), at worst 128 MiB for a file of one byte repeated (zstd's RLE blocks: 4 -> 128 KiB).
CHECK_FEED = 4 << 10

#: Compression levels accepted. zstd's own range goes up to 22, but 20..22 ("ultra") need far
#: more memory to compress and to decompress; they are not worth it for a spool.
MIN_LEVEL = 1
MAX_LEVEL = 19

_SRC_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_DST_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_DST_MODE = 0o640


class CompressResult(msgspec.Struct, frozen=True):
    """What `compress_file` did: sizes in bytes and the CPU seconds it took (of its thread)."""

    plain_bytes: int
    compressed_bytes: int
    cpu_s: float

    @property
    def ratio(self) -> float:
        """plain / compressed (1.0 for an empty file, whose frame is larger than its content)."""
        if self.plain_bytes == 0 or self.compressed_bytes == 0:
            return 1.0
        return self.plain_bytes / self.compressed_bytes


class FrameError(zstandard.ZstdError):
    """A `.zst` file is not one whole zstd frame (truncated, or followed by other bytes).

    A subclass of `zstandard.ZstdError`, which zstd raises for a corrupt frame or a bad checksum:
    `except zstandard.ZstdError` catches every way a file can fail `check_file`.
    """


def check_level(level: int) -> int:
    """`level` if it is a level `compress_file` accepts; ValueError otherwise."""
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be {MIN_LEVEL}..{MAX_LEVEL}, not {level!r}")
    return level


def compress_file(src: str, dst: str, level: int = 3) -> CompressResult:
    """Compress the regular file `src` into a new file `dst`, as one zstd frame; fsync `dst`.

    Raises OSError if `src` is a symlink or not a regular file, FileExistsError if `dst` exists
    (left untouched), ValueError for a level outside 1..19, `zstandard.ZstdError` if `src`
    changed size while it was read. On any exception `dst` is removed (if this call created it).
    """
    check_level(level)
    start = time.thread_time()
    src_fd = os.open(src, _SRC_FLAGS)
    try:
        size = _regular_size(src_fd, src)
        compressed = _compress_to_new(src_fd, size, dst, level)
    finally:
        os.close(src_fd)
    return CompressResult(plain_bytes=size, compressed_bytes=compressed, cpu_s=time.thread_time() - start)


def _regular_size(fd: int, path: str) -> int:
    """The size of the open file `fd`; OSError(EINVAL) if it is not a regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    return st.st_size


def _compress_to_new(src_fd: int, size: int, dst: str, level: int) -> int:
    """Create `dst`, fill it with the frame of `size` bytes of `src_fd`, fsync it: its size.

    Once `dst` is created, any exception removes it again before it propagates.
    """
    dst_fd = os.open(dst, _DST_FLAGS, _DST_MODE)
    try:
        try:
            compressed = _stream(src_fd, dst_fd, size, level)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    except BaseException:
        _remove_quietly(dst)
        raise
    return compressed


def _stream(src_fd: int, dst_fd: int, size: int, level: int) -> int:
    """Compress `src_fd` into `dst_fd`, `CHUNK` by `CHUNK`: the number of bytes written."""
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    with (
        open(src_fd, "rb", buffering=0, closefd=False) as fin,
        open(dst_fd, "wb", buffering=CHUNK, closefd=False) as fout,
    ):
        read, written = compressor.copy_stream(fin, fout, size=size, read_size=CHUNK, write_size=CHUNK)
    if read != size:  # zstd refuses a size other than the pledged one; never trust that blindly
        raise zstandard.ZstdError(f"read {read} bytes of a {size}-byte file")
    return written


def _remove_quietly(path: str) -> None:
    """Remove `path` if possible; never raise (an exception in flight matters more)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def check_file(path: str) -> int:
    """Decompress `path` as a stream and return the size of its content.

    Raises `zstandard.ZstdError` unless the file is exactly one whole, valid zstd frame: corrupt
    data or a checksum mismatch (from zstd), a truncated frame or bytes after the frame
    (`FrameError`: zstandard's stream readers end silently at a truncated frame, so this checks
    the decompressor's `eof` itself). OSError for a symlink or an unreadable file.
    """
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    total = 0
    fd = os.open(path, _SRC_FLAGS)
    with open(fd, "rb", buffering=CHUNK) as fin:
        while feed := fin.read(CHECK_FEED):
            if decompressor.eof:
                raise FrameError(f"{path}: bytes after the end of the zstd frame")
            total += len(decompressor.decompress(feed))
    if not decompressor.eof:
        raise FrameError(f"{path}: truncated zstd frame ({total} bytes decompressed)")
    if decompressor.unused_data:
        raise FrameError(f"{path}: bytes after the end of the zstd frame")
    return total


class RatioEstimate:
    """A conservative estimate of the compression ratio of the files to come, from recent ones.

    With compression on, the spool may let a plain file grow to `plain_limit(max_file_bytes)`
    so that the COMPRESSED object comes out near, and within, `max_file_bytes`.

    The estimate is the MINIMUM ratio of the last `window` observed files, times `margin`,
    clamped to [1.0, `max_ratio`]. The minimum, not the mean: when the data suddenly becomes less
    compressible (another model, another payload encoding), a mean would still remember the good
    old ratios and let the next files grow far too large; the minimum falls to the new ratio with
    the first such file, and `margin` leaves room for a file somewhat worse than any seen so far.
    `max_ratio` caps the growth of a plain file even for extremely compressible data.

    When it overshoots anyway (the data got worse than the estimate by more than the margin), the
    object of that file is a bit larger than `max_file_bytes`: by at most the misestimate, nothing
    fails. Its low ratio enters the window at once, so the very next estimate falls. The estimate
    rises again only when the bad files have left the window (after `window` better ones).

    Files smaller than `MIN_OBSERVED_BYTES` are ignored: a small file (sealed early by the hourly
    rotation, or at shutdown) compresses worse, its ratio says little about full-size ones.

    Not thread-safe: observe and read it from one thread (the event loop).
    """

    MIN_OBSERVED_BYTES = 64 << 10

    def __init__(self, margin: float = 0.8, window: int = 16, max_ratio: float = 20.0) -> None:
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1], not {margin!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, not {window!r}")
        if max_ratio < 1.0:
            raise ValueError(f"max_ratio must be >= 1, not {max_ratio!r}")
        self.margin = margin
        self.max_ratio = max_ratio
        self._ratios: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, result: CompressResult) -> None:
        """Learn from one compressed file (ignored if smaller than `MIN_OBSERVED_BYTES`)."""
        if result.plain_bytes >= self.MIN_OBSERVED_BYTES:
            self._ratios.append(result.ratio)

    @property
    def ratio(self) -> float:
        """min(ratio of the last `window` files) * margin, within [1.0, max_ratio]; 1.0 at first."""
        if not self._ratios:
            return 1.0
        return min(max(min(self._ratios) * self.margin, 1.0), self.max_ratio)

    def plain_limit(self, max_file_bytes: int) -> int:
        """How large a plain file may grow for its compressed object to stay within `max_file_bytes`."""
        return int(max_file_bytes * self.ratio)
