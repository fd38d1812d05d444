"""The daemon's sessions and journal alone: entries, replay, bounds, and a journal that cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captured.daemon import ledger
from captured.daemon.ledger import Ledger, encode_entry, read_entries, replay


def test_entries_read_back_until_the_first_torn_or_corrupt_one() -> None:
    a = encode_entry([(b"s" * 16, 10)], [("f1", 0)])
    b = encode_entry([(b"s" * 16, 20), (b"t" * 16, 5)], [("f1", 300), ("f2", 0)])
    entries, end = read_entries(a + b)
    assert end == len(a + b) and len(entries) == 2
    assert read_entries(a + b[:-1]) == (entries[:1], len(a))  # torn last entry
    corrupt = a + b[:9] + bytes([b[9] ^ 1]) + b[10:]
    assert read_entries(corrupt)[1] == len(a)  # its CRC does not match
    sessions, files = replay(entries)
    assert sessions == {b"s" * 16: 20, b"t" * 16: 5} and files == {"f1": 300, "f2": 0}


def test_a_journal_survives_a_reopen_with_sessions_and_committed_ends(tmp_path: Path) -> None:
    first = Ledger(str(tmp_path))
    assert first.load() == {}
    first.open()
    s = first.session(b"a" * 16)
    first.file_opened("stem-1")
    first.file_written("stem-1", 120)
    first.took(s, 7)
    assert s.committed == 0 and first.commit() and s.committed == 7
    first.file_written("stem-1", 180)  # written, its entry never made it (the daemon died)
    first.took(s, 9)
    first.close()
    second = Ledger(str(tmp_path))
    assert second.load() == {"stem-1": 120}
    assert second.sessions[b"a" * 16].taken == 7


def test_only_the_most_recently_active_sessions_are_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "MAX_SESSIONS", 3)
    led = Ledger(str(tmp_path))
    led.open()
    for i in range(5):
        led.took(led.session(bytes([i]) * 16), 1)
    led.session(bytes([2]) * 16)  # active again: the last to be forgotten
    assert list(led.sessions) == [bytes([3]) * 16, bytes([4]) * 16, bytes([2]) * 16]


def test_an_entry_that_cannot_be_written_keeps_everything_for_the_next(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: the entry fails, nothing is marked committed
    (so nothing is acknowledged), and the next commit on a writable journal carries it all."""
    led = Ledger(str(tmp_path))
    led.open()
    good_fd = led.fd
    led.fd = os.open("/dev/full", os.O_WRONLY)
    s = led.session(b"z" * 16)
    led.took(s, 4)
    led.file_written("stem", 64)
    assert not led.commit() and led.failed and s.committed == 0 and led.dirty
    os.close(led.fd)
    led.fd = good_fd
    assert led.commit() and not led.failed and s.committed == 4 and not led.dirty
    led.close()
    again = Ledger(str(tmp_path))
    assert again.load() == {"stem": 64} and again.sessions[b"z" * 16].taken == 4


def test_compaction_keeps_sessions_and_open_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    led = Ledger(str(tmp_path))
    led.open()
    s = led.session(b"c" * 16)
    for i in range(1, 200):
        led.took(s, i)
        led.file_written("open-file", i * 10)
        assert led.commit()
    big = led.size
    monkeypatch.setattr(ledger, "COMPACT_BYTES", 1024)
    led.compact_if_large([("open-file", 1990)])
    assert led.size < big / 10
    led.close()
    again = Ledger(str(tmp_path))
    assert again.load() == {"open-file": 1990} and again.sessions[b"c" * 16].taken == 199
