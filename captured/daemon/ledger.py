"""What each client session has had taken, and how far each spool file holds committed data:
kept in memory and in a journal beside the spool, so a restart or a crash writes nothing twice.

A protocol-2 client names a session (16 random bytes, new in every process) in HELLO and numbers
its records 0, 1, 2, ...; a BATCH carries the number of its first record. `Session.taken` is the
first number the daemon has not taken (written to the spool or dropped under a counted reason):
the records of a resent frame below it are skipped, so a record is never written twice.

The journal (`spool_dir/.journal`) makes this survive the daemon. After the frames of one read
are processed, one entry is appended: for every session that took records, its new `taken`;
for every spool file written, its new size (its committed end). Before a spool file gets its
first byte, an entry names it with end 0. An ACK only ever reports what an entry holds.

At start (`replay`), the entries are read back in order. A spool file the journal names is cut
to its committed end: bytes past it were written by frames whose entry never made it (the daemon
died between the data and the entry), and those records were never acknowledged, so the client
still holds them and sends them again. A file the journal does not name was sealed and fully
committed before the journal was last compacted (or is from a version without a journal): it is
only cut to its last complete line, as always. So after a kill -9 every record is in the spool
exactly once or still held by its client.

Entries are `>II` (length, CRC32) then a MessagePack `[[[session, taken], ...], [[stem, end], ...]]`;
reading stops at the first torn or corrupt entry. When the journal passes `COMPACT_BYTES` it is
rewritten as one entry: every session remembered and the open files' ends (everything is
committed at that moment), then renamed into place. At most `MAX_SESSIONS` sessions are
remembered, the least recently active forgotten first: a forgotten session that reconnects is
taken from whatever number it sends next.

Writes go to the page cache (what a kill -9 of the daemon keeps); the journal is flushed to
the disk with the spool files (every `spool.fsync_interval_s` and before a file is sealed), so a
power loss costs about what it costs the spool files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Iterable

import msgspec

log = logging.getLogger("captured.ledger")

JOURNAL = ".journal"
ENTRY = struct.Struct(">II")
#: Rewrite the journal as one snapshot entry once it is this large.
COMPACT_BYTES = 4 * 1024 * 1024
#: Sessions remembered at most (each about 100 bytes of memory and 30 of journal).
MAX_SESSIONS = 16384
#: An entry larger than this is taken as corruption when reading back.
MAX_ENTRY_BYTES = 64 * 1024 * 1024

Entry = tuple[list[tuple[bytes, int]], list[tuple[str, int]]]
_entry_decoder = msgspec.msgpack.Decoder(tuple[list[tuple[bytes, int]], list[tuple[str, int]]])
_encoder = msgspec.msgpack.Encoder()


class Session:
    """One client session: `taken` (in memory, for skipping resends) and `committed` (in the
    journal, what an ACK may report). They differ only between a frame and its entry, or after an
    entry could not be written."""

    __slots__ = ("committed", "sid", "taken")

    def __init__(self, sid: bytes, taken: int = 0) -> None:
        self.sid = sid
        self.taken = taken
        self.committed = taken


def encode_entry(sessions: Iterable[tuple[bytes, int]], files: Iterable[tuple[str, int]]) -> bytes:
    body = _encoder.encode((list(sessions), list(files)))
    return ENTRY.pack(len(body), zlib.crc32(body)) + body


def read_entries(data: bytes) -> tuple[list[Entry], int]:
    """The whole, intact entries at the start of `data` and the offset after the last of them."""
    out: list[Entry] = []
    pos = 0
    while len(data) - pos >= ENTRY.size:
        length, crc = ENTRY.unpack_from(data, pos)
        start = pos + ENTRY.size
        body = data[start : start + length]
        if length > MAX_ENTRY_BYTES or len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            out.append(_entry_decoder.decode(body))
        except msgspec.DecodeError:
            break
        pos = start + length
    return out, pos


def replay(entries: Iterable[Entry]) -> tuple[dict[bytes, int], dict[str, int]]:
    """Sessions' `taken` and files' committed ends after applying `entries` in order."""
    sessions: dict[bytes, int] = {}
    files: dict[str, int] = {}
    for sess, ends in entries:
        for sid, taken in sess:
            sessions.pop(sid, None)  # re-inserted: dict order is least recently active first
            sessions[sid] = taken
        for stem, end in ends:
            files[stem] = end
    return sessions, files


class Ledger:
    """Sessions in memory, the spool files written since the last entry, and the journal."""

    def __init__(self, spool_dir: str) -> None:
        self.path = os.path.join(spool_dir, JOURNAL)
        self.sessions: dict[bytes, Session] = {}
        self.dirty_sessions: dict[bytes, Session] = {}
        #: Spool files written since the last entry: stem -> size (committed end once written).
        self.dirty_files: dict[str, int] = {}
        self.fd = -1
        self.size = 0
        self.failed = False  # the last entry could not be written (logged once until it can)

    # ---- start ---------------------------------------------------------------------------------

    def load(self) -> dict[str, int]:
        """Read the journal a previous run left; return the files' committed ends (by stem)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:  # ELOOP: a planted link is never followed (`open` replaces it)
            log.error("cannot read the journal %s (%s): resent records may be written twice", self.path, exc)
            return {}
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            log.error("cannot read the journal %s (%s): resent records may be written twice", self.path, exc)
            return {}
        entries, end = read_entries(data)
        if end != len(data):
            log.warning("journal: ignored %d bytes of a torn or corrupt last entry", len(data) - end)
        sessions, files = replay(entries)
        for sid, taken in list(sessions.items())[-MAX_SESSIONS:]:
            self.sessions[sid] = Session(sid, taken)
        return files

    def open(self, open_files: Iterable[tuple[str, int]] = ()) -> None:
        """Start a fresh journal holding the sessions and `open_files` (stem, committed end)."""
        snapshot = encode_entry(((s.sid, s.committed) for s in self.sessions.values()), open_files)
        tmp = self.path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            _write_all(fd, snapshot)
            os.rename(tmp, self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.size = len(snapshot)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- sessions ------------------------------------------------------------------------------

    def session(self, sid: bytes) -> Session:
        """The session `sid`, remembered from now on (the least recently active one forgotten
        past MAX_SESSIONS)."""
        s = self.sessions.pop(sid, None)
        if s is None:
            s = Session(sid)
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        self.sessions[sid] = s
        return s

    def took(self, s: Session, next_seq: int) -> None:
        if next_seq > s.taken:
            s.taken = next_seq
            self.dirty_sessions[s.sid] = s

    # ---- spool hooks ---------------------------------------------------------------------------

    def file_opened(self, stem: str) -> None:
        """Before a spool file's first byte: an entry naming it, with end 0, and nothing else
        (the frame being written is not whole yet). Raises OSError if it cannot be written."""
        entry = encode_entry((), ((stem, 0),))
        try:
            _write_all(self.fd, entry)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(entry)

    def file_written(self, stem: str, size: int) -> None:
        self.dirty_files[stem] = size

    # ---- entries -------------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_sessions or self.dirty_files)

    def commit(self) -> bool:
        """Append one entry with what changed since the last; True when nothing is left to write.

        A failed write (the disk full, say) leaves everything dirty for the next call: nothing
        is acknowledged past the last entry written, so a crash meanwhile loses nothing (the
        client still holds those records) and duplicates nothing (the data past the files'
        committed ends is cut at the next start).
        """
        if not (self.dirty_sessions or self.dirty_files):
            return True
        entry = encode_entry(
            ((s.sid, s.taken) for s in self.dirty_sessions.values()), self.dirty_files.items()
        )
        try:
            _write_all(self.fd, entry)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # never leave half an entry before the next one
            if not self.failed:
                log.error("journal: cannot write (%s); acknowledgements wait until it can", exc)
                self.failed = True
            return False
        if self.failed:
            log.warning("journal: writing again")
            self.failed = False
        self.size += len(entry)
        for s in self.dirty_sessions.values():
            s.committed = s.taken
        self.dirty_sessions.clear()
        self.dirty_files.clear()
        return True

    def compact_if_large(self, open_files: Iterable[tuple[str, int]]) -> None:
        """Rewrite the journal as one snapshot once it passed COMPACT_BYTES (call when clean)."""
        if self.size < COMPACT_BYTES or self.dirty:
            return
        try:
            self.open(open_files)
        except OSError as exc:
            log.error("journal: cannot compact (%s); it keeps growing", exc)

    def statistics(self) -> SessionStats:
        return SessionStats(
            remembered=len(self.sessions), journal_bytes=self.size, journal_ok=not self.failed
        )

    def dup_fd(self) -> int:
        """A descriptor of the journal for the spool's syncer thread to flush and close (a
        compaction may close the ledger's own meanwhile); -1 when there is no journal."""
        return os.dup(self.fd) if self.fd >= 0 else -1


class SessionStats(msgspec.Struct, frozen=True):
    #: Protocol 2 client sessions remembered (at most `MAX_SESSIONS`).
    remembered: int
    journal_bytes: int
    #: False while the journal cannot be written (acknowledgements wait; capture goes on).
    journal_ok: bool


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
