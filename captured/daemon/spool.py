"""Hourly spool files: one open `.part` file per (endpoint, variant, UTC hour), sealed by rename.

File names in `spool_dir` carry everything delivery needs, so the directory listing is the
queue and survives restarts::

    {endpoint}.{variant}.{yyyy}-{mm}-{dd}-{hh}.{MM}-{SS}-{mmm}-{uuid4}.jsonl.part   open
    {endpoint}.{variant}.{yyyy}-{mm}-{dd}-{hh}.{MM}-{SS}-{mmm}-{uuid4}.jsonl        sealed

Endpoint and variant names cannot contain a dot (SageMaker's name pattern), so the name splits
unambiguously. `MM-SS-mmm` is the minute, second and millisecond of the file's first record;
the hour is the UTC hour of `inferenceTime` of every record in it. A `.part` file holds exactly
the complete JSON lines that will be delivered: every write is whole lines.

A file is sealed (renamed to `.jsonl` and handed to delivery) when the wall clock passes the end
of its hour, when it has been open `max_file_age_s`, or before a write would take it past
`max_file_bytes`.

Durability: the data of every open file is flushed to the disk (fdatasync) every
`fsync_interval_s`, and a file is flushed before it is sealed, so a sealed name always holds
durable data. Those flushes run on a `Syncer`: inline by default, on a background thread in the
daemon (`ThreadSyncer`), so a slow disk never holds up the event loop. A crash of the daemon
alone loses nothing written (the page cache keeps it); a power loss can cost what was written
since the last flush, and the next start cuts any file back to its last complete line.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from captured.daemon.ledger import Ledger
from captured.daemon.syncer import Syncer, sync_and_close, sync_dir
from captured.errors import SpoolWriteError
from captured.service.settings import SpoolConfig

log = logging.getLogger("captured.spool")

PART = ".part"
SEALED = ".jsonl"
#: A sealed file's compressed copy, made at delivery (`delivery.compressing`).
ZST = ".zst"

#: Disk space is reserved ahead of the writes to an open file: as much as the file holds, at
#: least RESERVE_MIN and at most RESERVE_MAX bytes (and never past `max_file_bytes`) at a time,
#: so a quiet file reserves little. The file's size does not change (FALLOC_FL_KEEP_SIZE); what
#: is left past the last line is given back when the file is sealed. Reserving ahead spares the
#: filesystem its per-page work of finding room for delayed writes: on ext4 the kernel's CPU for
#: writing and flushing a spool file drops (`bench/spool_write.py`, measured in bench/README.md).
RESERVE_MIN = 1024 * 1024
RESERVE_MAX = 16 * 1024 * 1024
#: Nothing is reserved for a file until it grows past this: a client sending one tiny record per
#: distinct (variant, hour) cannot make every such file take RESERVE_MIN of disk.
RESERVE_AFTER = 64 * 1024
_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """fallocate(2) with its mode argument, which `os.posix_fallocate` lacks; None if absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def reserve(fd: int, offset: int, length: int) -> bool:
    """Reserve `length` bytes of disk from `offset` without changing the file's size.

    Best effort: False when the platform or the filesystem cannot (EOPNOTSUPP) or the disk is
    full (ENOSPC, then the write itself reports it as it always has).
    """
    if _fallocate is None or length <= 0:
        return False
    return _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def file_stem(endpoint: str, variant: str, hour: int, first_time: float, unique: str) -> str:
    """The spool name (without suffix) of a file whose first record has time `first_time`."""
    t = time.gmtime(hour * 3600)
    ms = int(first_time * 1000) % 1000
    minute_second = time.gmtime(int(first_time))
    return (
        f"{endpoint}.{variant}.{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}-{t.tm_hour:02d}."
        f"{minute_second.tm_min:02d}-{minute_second.tm_sec:02d}-{ms:03d}-{unique}"
    )


def object_key(sealed_name: str) -> str:
    """`{endpoint}/{variant}/yyyy/mm/dd/hh/MM-SS-mmm-uuid.jsonl` for a sealed spool file name."""
    base = os.path.basename(sealed_name)
    if not base.endswith(SEALED):
        raise ValueError(f"not a sealed spool file: {sealed_name!r}")
    endpoint, variant, hour, rest = base.split(".", 3)
    yyyy, mm, dd, hh = hour.split("-")
    return f"{endpoint}/{variant}/{yyyy}/{mm}/{dd}/{hh}/{rest}"


class SpoolStats(msgspec.Struct, frozen=True):
    dir: str
    #: Files not yet handed to delivery: open, or being flushed and sealed.
    open_files: int
    files_sealed: int
    bytes_written: int
    #: Files sealed early because `spool.max_open_files` were open.
    sealed_for_room: int


@dataclass(slots=True)
class OpenFile:
    path: str
    stem: str
    fd: int
    hour: int
    opened_at: float  # monotonic
    size: int = 0
    synced: int = 0  # bytes known to be on the disk
    reserved: int = 0  # disk reserved for this file (`reserve`), past `size` as a rule
    reserving: bool = True  # False once reserving failed (unsupported, or the disk is full)


class Spool:
    """Writes JSON-lines chunks into hourly `.part` files and seals them.

    `clock` (wall, epoch seconds) and `monotonic` are injected so rotation is testable without
    sleeping. `on_sealed(path, size)` receives each sealed file.
    """

    def __init__(
        self,
        spool_dir: str,
        cfg: SpoolConfig,
        on_sealed: Callable[[str, int], None],
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        syncer: Syncer | None = None,
        reserve_ahead: bool = True,
        ledger: Ledger | None = None,
    ) -> None:
        self.dir = spool_dir
        self.max_age_s = cfg.max_file_age_s
        self.max_bytes = cfg.max_file_bytes
        self.fsync_interval_s = cfg.fsync_interval_s
        self.max_open = cfg.max_open_files
        self.sealed_for_room = 0  # files sealed early because max_open_files were open
        self.sealing = 0  # sealed, not yet handed to delivery (the syncer flushes and renames)
        self._journal_sync: _JournalSync | None = None
        self.syncer = syncer or Syncer()
        self.reserve_ahead = reserve_ahead
        #: Told of every file before its first byte and of every size written (`ledger`).
        self.ledger = ledger
        self._synced_at = monotonic()
        self._on_sealed = on_sealed
        self._clock = clock
        self._monotonic = monotonic
        self._open: dict[tuple[str, str, int], OpenFile] = {}
        self.files_sealed = 0
        self.bytes_written = 0
        os.makedirs(spool_dir, exist_ok=True)

    @property
    def open_files(self) -> int:
        """Files not yet handed to delivery: open ones, and sealed ones whose flush and rename
        still run on the syncer (or failed: the `.part` then waits for recovery). So a status
        showing no open file and no file waiting for delivery means everything was delivered."""
        return len(self._open) + self.sealing

    def write(
        self, endpoint: str, variant: str, hour: int, times: float | Sequence[float], data: bytes
    ) -> None:
        """Append whole JSON lines `data` to the open file of (endpoint, variant, hour).

        `times` are the lines' records' times (epoch seconds), one a line, or one for all: a file
        opened for a line is named after its time, so each file after its own first record. Data larger than
        what the current file may still take is split at line boundaries across files. A failed
        write raises `SpoolWriteError` (an OSError with the failed call's errno) whose `written`
        says how many bytes of `data` (whole lines) went into files before it: they are in the
        spool all the same.
        """
        key = (endpoint, variant, hour)
        f = self._open.pop(key, None)
        if f is not None:
            self._open[key] = f  # most recently written last: `_open_file` seals from the front
        done = 0
        whole = data
        try:
            while data:
                if f is None:
                    if isinstance(times, int | float):
                        first = times
                    else:  # counting lines only when a write splits
                        first = times[whole.count(b"\n", 0, done) if done else 0]
                    f = self._open_file(key, first)
                room = self.max_bytes - f.size
                if len(data) <= room:
                    chunk, data = data, b""
                else:
                    cut = data.rfind(b"\n", 0, room) + 1
                    if cut == 0:
                        if f.size > 0:  # the next line does not fit: start a new file
                            self._seal(key)
                            f = None
                            continue
                        # a single line larger than max_file_bytes: it gets a file of its own
                        cut = data.index(b"\n") + 1
                    chunk, data = data[:cut], data[cut:]
                if f.reserving and f.size + len(chunk) > max(f.reserved, RESERVE_AFTER):
                    self._reserve(f, len(chunk))
                try:
                    self._write_all(f, chunk)
                except OSError:
                    self._seal_after_failure(key)
                    raise
                done += len(chunk)
                if data or f.size >= self.max_bytes:
                    self._seal(key)
                    f = None
        except OSError as exc:
            raise SpoolWriteError(error=exc, written=done) from exc

    def tick(self) -> None:
        """Seal files whose hour has ended (wall clock) or that have been open too long; flush
        open files to the disk every `fsync_interval_s`."""
        now_hour = int(self._clock()) // 3600
        now = self._monotonic()
        deadline = now - self.max_age_s
        for key, f in list(self._open.items()):
            if f.hour < now_hour or f.opened_at <= deadline:
                self._seal(key)
        if self.fsync_interval_s and now - self._synced_at >= self.fsync_interval_s:
            self._synced_at = now
            if not self.syncer.busy():  # the disk is behind: never pile up flushes
                self.sync_open()

    def sync_open(self) -> None:
        """fdatasync every open file with unflushed data, and the journal (on the syncer)."""
        todo = [f for f in self._open.values() if f.synced < f.size]
        if todo:
            self._sync_journal()
        for f in todo:
            fd, size = os.dup(f.fd), f.size
            self.syncer.run(sync_and_close(fd), _mark_synced(f, size))

    def statistics(self) -> SpoolStats:
        return SpoolStats(
            dir=self.dir,
            open_files=self.open_files,
            files_sealed=self.files_sealed,
            bytes_written=self.bytes_written,
            sealed_for_room=self.sealed_for_room,
        )

    def committed_ends(self) -> list[tuple[str, int]]:
        """(stem, size) of every open file: its committed end when the ledger has no dirt."""
        return [(f.stem, f.size) for f in self._open.values()]

    def seal_all(self, endpoint: str | None = None) -> None:
        """Seal every open file, or every open file of `endpoint`."""
        for key in list(self._open):
            if endpoint is None or key[0] == endpoint:
                self._seal(key)

    def _open_file(self, key: tuple[str, str, int], first_time: float) -> OpenFile:
        while len(self._open) >= self.max_open:
            self._seal(next(iter(self._open)))  # the least recently written makes room
            self.sealed_for_room += 1
        endpoint, variant, hour = key
        stem = file_stem(endpoint, variant, hour, first_time, str(uuid.uuid4()))
        path = os.path.join(self.dir, stem + SEALED + PART)
        if self.ledger is not None:
            self.ledger.file_opened(stem)  # in the journal before its first byte is in the file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        f = self._open[key] = OpenFile(path, stem, fd, hour, self._monotonic())
        f.reserving = self.reserve_ahead
        return f

    def _reserve(self, f: OpenFile, need: int) -> None:
        """Reserve the next stretch of disk for `f`: at least `need` bytes past its end."""
        step = min(max(f.size, RESERVE_MIN), RESERVE_MAX, self.max_bytes - f.reserved)
        length = max(step, f.size + need - f.reserved)
        if reserve(f.fd, f.reserved, length):
            f.reserved += length
        else:  # not supported here, or the disk is full: write without reserving
            f.reserving = False

    def _write_all(self, f: OpenFile, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                n = os.write(f.fd, view)
                view = view[n:]
        except OSError:
            # ENOSPC or EIO part-way: cut the file back so it still holds whole lines only.
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, f.size)
            raise
        f.size += len(chunk)
        self.bytes_written += len(chunk)
        if self.ledger is not None:
            self.ledger.file_written(f.stem, f.size)

    def _seal_after_failure(self, key: tuple[str, str, int]) -> None:
        """A write to this file failed: seal what it holds, so its complete lines go on.

        `_write_all` already cut the file back to whole lines. If that cut failed as well (EIO),
        the file stays a `.part` in the spool for the next start's recovery, which cuts it.
        """
        f = self._open[key]
        try:
            os.truncate(f.path, f.size)
        except OSError as exc:
            log.error(
                "cannot cut %s back to whole lines (%s); left for recovery at the next start", f.path, exc
            )
            self._open.pop(key)
            with contextlib.suppress(OSError):
                os.close(f.fd)
            return
        with contextlib.suppress(OSError):
            self._seal(key)

    def _seal(self, key: tuple[str, str, int]) -> None:
        """Close the file, then flush and rename it (on the syncer) and hand it to delivery.

        Its descriptor is closed here, at once: the syncer opens the file again by name. So a
        file waiting to be sealed holds no descriptor, however many one batch seals (a client
        sending 2,000 distinct hours must not take the daemon's descriptors).
        """
        f = self._open.pop(key)
        os.close(f.fd)
        if f.size == 0:
            os.unlink(f.path)
            return
        sealed = f.path[: -len(PART)]
        self.files_sealed += 1
        self.sealing += 1
        self._sync_journal()  # the journal names the file and its end before the rename
        path, size, trim, flush = f.path, f.size, f.reserved > f.size, f.synced < f.size

        def work() -> None:
            if trim or flush:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    if trim:  # give back the disk reserved past the last line
                        os.ftruncate(fd, size)
                    if flush:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            os.rename(path, sealed)
            sync_dir(self.dir)

        def then() -> None:  # not called when the flush or the rename failed (logged): the
            # `.part` file then stays in the spool for the next start's recovery
            log.debug("sealed %s (%d bytes)", sealed, size)
            self.sealing -= 1
            self._on_sealed(sealed, size)

        self.syncer.run(work, then)

    def _sync_journal(self) -> None:
        """Queue an fdatasync of the journal, unless one queued and not yet begun covers it."""
        if self.ledger is None or (self._journal_sync is not None and not self._journal_sync.started):
            return
        fd = self.ledger.dup_fd()
        if fd >= 0:
            self._journal_sync = _JournalSync(fd)
            self.syncer.run(self._journal_sync)


class _JournalSync:
    """fdatasync and close a duplicate of the journal's descriptor. Whatever the journal held
    when `started` turned True is on the disk afterwards; its failure (the disk) does not hold
    up what follows: the journal's own commits report it."""

    __slots__ = ("fd", "started")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = False

    def __call__(self) -> None:
        self.started = True
        try:
            os.fdatasync(self.fd)
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _mark_synced(f: OpenFile, size: int) -> Callable[[], None]:
    def then() -> None:
        f.synced = max(f.synced, size)

    return then
