"""What an earlier run left in the spool (`captured.daemon.recovery`): the scan, cutting files to
whole lines and to their committed ends in the journal, sealing, and the spool's lock.

Real files in tmp_path, a real `Ledger` and, where a file must be written as the daemon writes
it, a real `Spool` (inline `Syncer`)."""

from __future__ import annotations

import calendar
import os
from pathlib import Path

import pytest

from captured.daemon import spool as spool_module
from captured.daemon.ledger import Ledger
from captured.daemon.recovery import lock_spool, recover, recover_part, scan_spool
from captured.daemon.spool import Spool
from captured.service.settings import SpoolConfig

NAME = "ep.AllTraffic.2021-05-18-00.28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl"
T0 = calendar.timegm((2021, 5, 18, 0, 28, 4)) + 0.146
HOUR = int(T0) // 3600


def lines(n: int, width: int = 10) -> bytes:
    return b"".join(b"x" * (width - 1) + b"\n" for _ in range(n))


def _allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def spool_name(minute: int, suffix: str = ".jsonl") -> str:
    return f"ep.AllTraffic.2021-05-18-00.{minute:02d}-00-000-{minute:08d}-0000-0000-0000-000000000000{suffix}"


# -- recover_part and scan_spool (moved from test_spool.py and test_deliver.py) ------------------


def test_recover_part_cuts_a_torn_last_line(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl.part"
    p.write_bytes(lines(3) + b'{"torn')
    assert recover_part(str(p)) == 30
    assert p.read_bytes() == lines(3)
    p.write_bytes(b"no newline at all")
    assert recover_part(str(p)) == 0
    big = lines(20000) + b"x" * 70000  # torn tail longer than one read block
    p.write_bytes(big)
    assert recover_part(str(p)) == 200000


def test_recovery_gives_back_disk_reserved_past_the_last_line(tmp_path: Path) -> None:
    part = tmp_path / "e.AllTraffic.2021-05-18-00.28-04-146-x.jsonl.part"
    part.write_bytes(lines(100))
    fd = os.open(part, os.O_WRONLY)
    try:
        if not spool_module.reserve(fd, 0, 8 * 1024 * 1024) or _allocated(part) < 8 * 1024 * 1024:
            pytest.skip("this filesystem does not reserve space with FALLOC_FL_KEEP_SIZE")
    finally:
        os.close(fd)
    assert recover_part(str(part)) == len(lines(100))
    assert part.read_bytes() == lines(100) and _allocated(part) < 65536


def test_scan_spool_takes_only_its_endpoint(tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(b"1\n")
    (tmp_path / ("other-" + NAME)).write_bytes(b"1\n")
    (tmp_path / (NAME + ".part")).write_bytes(b"1\n")
    sealed, parts = scan_spool(str(tmp_path), {"ep"})
    assert [os.path.basename(p) for p, _ in sealed] == [NAME]
    assert [os.path.basename(p) for p in parts] == [NAME + ".part"]


# -- recover ---------------------------------------------------------------------------------------


def run_recover(spool_dir: Path) -> tuple[list[tuple[str, int]], Ledger]:
    """`recover` as a fresh daemon calls it (a new Ledger); the ledger is closed again."""
    ledger = Ledger(str(spool_dir))
    try:
        return recover(str(spool_dir), {"ep"}, ledger), ledger
    finally:
        ledger.close()


def spool_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.iterdir() if p.name.startswith("ep."))


def test_a_torn_part_is_cut_to_its_last_newline_and_sealed(tmp_path: Path) -> None:
    """No journal (an older version, or it was lost): a `.part` of 3 lines and a torn fourth
    is cut to 30 bytes and renamed to its sealed name, which `recover` returns with that size."""
    part = tmp_path / spool_name(1, ".jsonl.part")
    part.write_bytes(lines(3) + b'{"torn')
    sealed, ledger = run_recover(tmp_path)
    target = tmp_path / spool_name(1)
    assert sealed == [(str(target), 30)]
    assert not part.exists() and target.read_bytes() == lines(3)
    assert spool_files(tmp_path) == [target.name]
    assert ledger.sessions == {} and (tmp_path / ".journal").is_file()  # a fresh journal


def test_empty_and_lineless_files_are_removed_and_the_rest_returned_oldest_first(tmp_path: Path) -> None:
    """Five files: an empty `.part`, a `.part` with no newline at all, an empty sealed file, and
    two whole sealed files with mtimes 200 s and 100 s ago. The three without a whole line are
    removed; the two whole ones are returned oldest first with their sizes, then none else."""
    (tmp_path / spool_name(1, ".jsonl.part")).write_bytes(b"")
    (tmp_path / spool_name(2, ".jsonl.part")).write_bytes(b'{"never finished')
    (tmp_path / spool_name(3)).write_bytes(b"")
    newer, older = tmp_path / spool_name(4), tmp_path / spool_name(5)
    newer.write_bytes(lines(2))
    older.write_bytes(lines(5))
    now = os.stat(tmp_path).st_mtime
    os.utime(newer, (now - 100, now - 100))
    os.utime(older, (now - 200, now - 200))
    sealed, _ = run_recover(tmp_path)
    assert sealed == [(str(older), 50), (str(newer), 20)]
    assert spool_files(tmp_path) == sorted([older.name, newer.name])
    assert sum(size for _, size in sealed) == sum(p.stat().st_size for p in (older, newer))


def test_a_file_the_journal_names_is_cut_to_its_committed_end(tmp_path: Path) -> None:
    """The daemon writes 5 lines through its Spool and commits them (and a session at 5), then
    writes 2 more lines it never commits (it died before the entry), and a torn line lands
    after them (appended by hand). A second file is written and committed whole. The next
    start cuts the first file to the committed 50 bytes, keeps the second whole, seals both and
    remembers the session at 5. A start after that changes nothing."""
    ledger = Ledger(str(tmp_path))
    ledger.open()
    spool = Spool(str(tmp_path), SpoolConfig(), lambda p, n: None, clock=lambda: T0, ledger=ledger)
    sid = b"s" * 16
    spool.write("ep", "AllTraffic", HOUR, T0, lines(5))
    spool.write("ep", "Canary", HOUR, T0, lines(4, width=20))
    ledger.took(ledger.session(sid), 5)
    assert ledger.commit()
    spool.write("ep", "AllTraffic", HOUR, T0, lines(2))  # no commit follows
    stems = dict(spool.committed_ends())
    parts = {p.name.split(".")[1]: p for p in tmp_path.glob("*.part")}
    with open(parts["AllTraffic"], "ab") as fh:
        fh.write(b"y" * 9 + b"\n" + b'{"torn')  # one more whole line and a torn one
    assert parts["AllTraffic"].stat().st_size == 70 + 16 and parts["Canary"].stat().st_size == 80
    # The daemon dies: the kernel closes its descriptors, nothing is sealed.
    for f in spool._open.values():
        os.close(f.fd)
    ledger.close()
    assert len(stems) == 2

    sealed, after = run_recover(tmp_path)
    assert sorted((Path(p).name.split(".")[1], size) for p, size in sealed) == [
        ("AllTraffic", 50),
        ("Canary", 80),
    ]
    by_variant = {Path(p).name.split(".")[1]: Path(p) for p, _ in sealed}
    assert by_variant["AllTraffic"].read_bytes() == lines(5)
    assert by_variant["Canary"].read_bytes() == lines(4, width=20)
    assert not list(tmp_path.glob("*.part"))
    assert after.sessions[sid].taken == after.sessions[sid].committed == 5

    again, _ = run_recover(tmp_path)  # the journal no longer names them: only whole lines count
    assert sorted(again) == sorted(sealed)


def test_a_file_cut_to_a_committed_end_of_zero_is_removed(tmp_path: Path) -> None:
    """The journal names a file with end 0 before its first byte: a crash right after its
    first (uncommitted) write leaves a file with whole lines that nobody acknowledged. It is
    cut to nothing and removed, not delivered."""
    ledger = Ledger(str(tmp_path))
    ledger.open()
    spool = Spool(str(tmp_path), SpoolConfig(), lambda p, n: None, clock=lambda: T0, ledger=ledger)
    spool.write("ep", "AllTraffic", HOUR, T0, lines(3))  # never committed
    for f in spool._open.values():
        os.close(f.fd)
    ledger.close()
    sealed, _ = run_recover(tmp_path)
    assert sealed == [] and spool_files(tmp_path) == []


def test_recover_leaves_another_endpoints_files_and_links_alone(tmp_path: Path) -> None:
    """Another endpoint's torn `.part` and a symbolic link under this endpoint's name: neither
    cut, renamed, returned, nor followed."""
    other = tmp_path / ("other-" + spool_name(1, ".jsonl.part"))
    other.write_bytes(lines(1) + b"torn")
    target = tmp_path / "target"
    target.write_bytes(lines(1) + b"torn")
    link = tmp_path / spool_name(2, ".jsonl.part")
    link.symlink_to(target)
    sealed, _ = run_recover(tmp_path)
    assert sealed == []
    assert other.read_bytes() == lines(1) + b"torn" and target.read_bytes() == lines(1) + b"torn"
    assert link.is_symlink()


# -- lock_spool ------------------------------------------------------------------------------------


def test_lock_spool_refuses_a_second_lock_until_the_first_is_released(tmp_path: Path) -> None:
    fd = lock_spool(str(tmp_path))
    try:
        with pytest.raises(BlockingIOError, match="another daemon is using the spool"):
            lock_spool(str(tmp_path))
    finally:
        os.close(fd)
    fd = lock_spool(str(tmp_path))  # released with its descriptor
    os.close(fd)
    assert (tmp_path / ".lock").is_file()


def test_lock_spool_refuses_a_symbolic_link_and_creates_nothing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / ".lock").symlink_to(target)
    with pytest.raises(OSError, match="is a symbolic link"):
        lock_spool(str(tmp_path))
    assert not target.exists() and (tmp_path / ".lock").is_symlink()


def test_lock_spool_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(OSError, match="not a regular file"):
        lock_spool(str(tmp_path))
