"""Hourly spool files: naming, sealing rules (with injected clocks), flushes and reserved disk.

Recovery of what a crash left (`recover_part`) is tested in test_recovery.py."""

from __future__ import annotations

import calendar
import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from captured.daemon import spool as spool_module
from captured.daemon.spool import Spool, file_stem, object_key
from captured.daemon.syncer import Syncer, ThreadSyncer
from captured.errors import SpoolWriteError
from captured.service.settings import SpoolConfig

UUID = "08d6d8b9-c7ac-4427-93a1-5eece415565d"
T0 = calendar.timegm((2021, 5, 18, 0, 28, 4)) + 0.146  # 2021-05-18T00:28:04.146Z


class Clock:
    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall = wall
        self.mono = mono

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def make_spool(tmp_path: Path, clock: Clock, **cfg: float) -> tuple[Spool, list[tuple[str, int]]]:
    sealed: list[tuple[str, int]] = []
    spool = Spool(
        str(tmp_path),
        SpoolConfig(**cfg),  # type: ignore[arg-type]
        lambda p, n: sealed.append((p, n)),
        clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
    )
    return spool, sealed


def lines(n: int, width: int = 10) -> bytes:
    return b"".join(b"x" * (width - 1) + b"\n" for _ in range(n))


def test_file_stem_and_object_key() -> None:
    stem = file_stem("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, UUID)
    assert stem == f"churn-endpoint.AllTraffic.2021-05-18-00.28-04-146-{UUID}"
    assert object_key(stem + ".jsonl") == f"churn-endpoint/AllTraffic/2021/05/18/00/28-04-146-{UUID}.jsonl"


def test_write_then_seal_on_age(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_age_s=60)
    hour = int(T0) // 3600
    spool.write("churn-endpoint", "AllTraffic", hour, T0, lines(3))
    (part,) = os.listdir(tmp_path)
    assert part.endswith(".jsonl.part")
    clock.advance(59)
    spool.tick()
    assert not sealed
    clock.advance(1)
    spool.tick()
    assert len(sealed) == 1
    path, size = sealed[0]
    assert size == 30 and Path(path).read_bytes() == lines(3)
    assert re.fullmatch(
        r"churn-endpoint\.AllTraffic\.2021-05-18-00\.28-04-146-[0-9a-f-]{36}\.jsonl", os.path.basename(path)
    )
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_seal_when_the_hour_ends(tmp_path: Path) -> None:
    clock = Clock(calendar.timegm((2021, 5, 18, 0, 59, 58)))
    spool, sealed = make_spool(tmp_path, clock, max_file_age_s=3600)
    spool.write("churn-endpoint", "AllTraffic", int(clock.wall) // 3600, clock.wall, lines(1))
    clock.advance(1.5)
    spool.tick()
    assert not sealed
    clock.advance(1)  # 01:00:00.5
    spool.tick()
    assert len(sealed) == 1


def test_late_record_goes_to_its_own_hour(tmp_path: Path) -> None:
    clock = Clock(calendar.timegm((2021, 5, 18, 1, 0, 5)))
    spool, sealed = make_spool(tmp_path, clock)
    late = calendar.timegm((2021, 5, 18, 0, 59, 59))
    spool.write("churn-endpoint", "AllTraffic", int(late) // 3600, late, lines(1))
    spool.write("churn-endpoint", "AllTraffic", int(clock.wall) // 3600, clock.wall, lines(1))
    assert spool.open_files == 2
    spool.tick()  # the 00 hour has ended: its file is sealed at once
    assert [os.path.basename(p).split(".")[2] for p, _ in sealed] == ["2021-05-18-00"]
    spool.seal_all()
    assert len(sealed) == 2


def test_a_split_write_names_each_file_after_its_own_first_record(tmp_path: Path) -> None:
    """250 lines, a record each a second apart, split across three files at max_file_bytes: the
    second file is named after line 102's time and the third after line 204's (SageMaker: the
    file's name is the time of its first record), not after the write's first line."""
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_bytes=1024)
    times = [T0 + i * 1.001 for i in range(250)]
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, times, lines(250))
    spool.seal_all()
    names = sorted((os.path.basename(p), n) for p, n in sealed)
    starts = [0, 102, 204]  # 102 lines of 10 bytes fit in 1024
    expected = [
        file_stem("churn-endpoint", "AllTraffic", int(T0) // 3600, times[i], "U").rsplit(".", 1)[1][:10]
        for i in starts
    ]
    assert [name.split(".")[3][:10] for name, _ in names] == sorted(expected)
    assert sorted(n for _, n in names) == sorted([1020, 1020, 460])


def test_open_files_are_capped_and_small_files_reserve_nothing(tmp_path: Path) -> None:
    """A record each for 2,000 distinct future hours (what a hostile client sends to hold the
    spool): never more than max_open_files open, the least recently written sealed first (an
    active file stays open), and no disk reserved for any file of one tiny line."""
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_open_files=8)
    hour = int(T0) // 3600
    most = 0
    for i in range(2000):
        spool.write(
            "churn-endpoint", "AllTraffic", hour, T0, lines(1)
        )  # the good client's file, written every time
        spool.write("churn-endpoint", "AllTraffic", hour + 1 + i, T0 + 3600 * (1 + i), lines(1))
        most = max(most, spool.open_files)
        if i % 200 == 0:
            for part in tmp_path.glob("*.part"):
                # what it holds (filesystem blocks), never RESERVE_MIN ahead
                assert _allocated(part) <= part.stat().st_size + 16384 < spool_module.RESERVE_MIN
    assert most == 8 and spool.sealed_for_room == 2000 + 1 - 8
    good = [p for p in tmp_path.glob("*.part") if f"-{hour % 24:02d}." in p.name]
    assert len(good) == 1 and good[0].read_bytes() == lines(2000)  # never sealed for room
    spool.seal_all()
    assert sum(n for _, n in sealed) == len(lines(1)) * 4000


def test_size_limit_splits_at_line_boundaries(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_bytes=1024)
    data = lines(250)  # 2500 bytes of 10-byte lines
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, data)
    spool.seal_all()
    sizes = [n for _, n in sealed]
    assert sizes == [1020, 1020, 460]
    assert b"".join(Path(p).read_bytes() for p, _ in sealed) == data
    for p, _ in sealed:
        assert Path(p).read_bytes().endswith(b"\n")


def test_a_line_larger_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_bytes=1024)
    hour = int(T0) // 3600
    spool.write("churn-endpoint", "AllTraffic", hour, T0, lines(1))
    spool.write("churn-endpoint", "AllTraffic", hour, T0, lines(1, width=3000) + lines(1))
    spool.seal_all()
    assert [n for _, n in sealed] == [10, 3000, 10]


def test_variants_get_separate_files(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock)
    hour = int(T0) // 3600
    spool.write("churn-endpoint", "AllTraffic", hour, T0, lines(1))
    spool.write("churn-endpoint", "Canary", hour, T0, lines(2))
    spool.seal_all()
    keys = sorted(object_key(p).split("/")[1] for p, _ in sealed)
    assert keys == ["AllTraffic", "Canary"]


def test_empty_file_is_never_sealed(tmp_path: Path) -> None:
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock)
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, b"")
    spool.seal_all()
    assert sealed == [] and os.listdir(tmp_path) == []


class RecordingSyncer(Syncer):
    """Inline, but remembers what it ran: ("sync", fd) flushes and seals."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, work: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        self.calls.append(getattr(work, "__qualname__", "?").split(".<locals>")[0].split(".")[-1])
        super().run(work, then)


def test_open_files_are_flushed_every_interval_and_before_sealing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    clock = Clock(T0)
    syncer = RecordingSyncer()
    sealed: list[tuple[str, int]] = []
    spool = Spool(
        str(tmp_path),
        SpoolConfig(max_file_age_s=60, fsync_interval_s=1.0),
        lambda p, n: sealed.append((p, n)),
        clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        syncer=syncer,
    )
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, lines(3))
    clock.advance(0.5)
    spool.tick()
    assert synced == []  # not yet due
    clock.advance(0.6)
    spool.tick()
    assert len(synced) == 1  # one open file with unflushed data
    clock.advance(1.0)
    spool.tick()
    assert len(synced) == 1  # nothing new to flush
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, lines(2))
    spool.seal_all()
    assert len(synced) == 2 and len(sealed) == 1  # flushed before the rename
    assert syncer.calls == ["sync_and_close", "_seal"]


def test_without_an_interval_files_are_flushed_only_when_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, fsync_interval_s=0)
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, lines(3))
    for _ in range(5):
        clock.advance(1.0)
        spool.tick()
    assert synced == []
    spool.seal_all()
    assert len(synced) == 1 and len(sealed) == 1


def test_thread_syncer_runs_in_order_off_the_loop_and_reports_back_on_it(tmp_path: Path) -> None:
    import asyncio
    import threading

    async def main() -> list[str]:
        syncer = ThreadSyncer(asyncio.get_running_loop())
        order: list[str] = []
        loop_thread = threading.get_ident()
        for i in range(5):
            syncer.run(
                lambda i=i: order.append(f"work{i}:{threading.get_ident() != loop_thread}"),
                lambda i=i: order.append(f"then{i}:{threading.get_ident() == loop_thread}"),
            )

        def fail() -> None:
            raise OSError("EIO")

        syncer.run(fail, lambda: order.append("then-after-failure"))
        await syncer.wait()
        return order

    order = asyncio.run(main())
    assert [o for o in order if o.startswith("work")] == [f"work{i}:True" for i in range(5)]
    assert [o for o in order if o.startswith("then")] == [f"then{i}:True" for i in range(5)]


def test_a_failed_write_reports_the_whole_lines_already_in_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data split across two files; the second file's write fails (ENOSPC, injected at os.write):
    the error says 1,020 bytes of whole lines went in, and the sealed first file holds exactly
    those, so the pipeline can count them as written and only the rest as write_error."""
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_bytes=1024)
    data = lines(150)
    real_write = os.write
    calls = {"n": 0}

    def failing_second_write(fd: int, buf: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", failing_second_write)
    with pytest.raises(SpoolWriteError) as info:
        spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, data)
    monkeypatch.undo()
    assert info.value.written == 1020
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC  # the gate reads errno
    assert info.value.__cause__ is info.value.error and info.value.error.errno == errno.ENOSPC
    assert [n for _, n in sealed] == [1020] and Path(sealed[0][0]).read_bytes() == data[:1020]


def _allocated(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def test_open_files_reserve_disk_ahead_and_give_it_back_when_sealed(tmp_path: Path) -> None:
    """Disk is reserved in steps past the end of an open file (its size stays the bytes
    written, so nothing reading it sees the reservation), and given back at the seal."""
    if spool_module._fallocate is None:
        pytest.skip("no fallocate(2) here")
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock, max_file_bytes=64 * 1024 * 1024)
    hour = int(T0) // 3600
    data = lines(10_000, width=100)  # 1 MB
    spool.write("churn-endpoint", "AllTraffic", hour, T0, data)
    (part,) = tmp_path.iterdir()
    assert part.stat().st_size == len(data)
    if _allocated(part) < spool_module.RESERVE_MIN:
        pytest.skip("this filesystem does not reserve space with FALLOC_FL_KEEP_SIZE")
    spool.seal_all()
    ((path, size),) = sealed
    assert size == len(data) and Path(path).read_bytes() == data
    assert _allocated(path) < len(data) + 65536


def test_writes_go_on_where_disk_cannot_be_reserved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fallocate(2) (another platform, a filesystem that refuses it, a full disk) the
    spool writes as before."""
    monkeypatch.setattr(spool_module, "_fallocate", None)
    assert not spool_module.reserve(0, 0, 4096)
    clock = Clock(T0)
    spool, sealed = make_spool(tmp_path, clock)
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, lines(5))
    spool.write("churn-endpoint", "AllTraffic", int(T0) // 3600, T0, lines(5))
    spool.seal_all()
    ((path, size),) = sealed
    assert Path(path).read_bytes() == lines(10) and size == len(lines(10))
