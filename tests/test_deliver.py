"""Delivery to a local destination: atomic appearance, across filesystems too, and retries."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from captured.delivery.queue import Delivery, LocalDestination, file_uri_path, scan_spool

NAME = "ep.AllTraffic.2021-05-18-00.28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl"
KEY = "ep/AllTraffic/2021/05/18/00/28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl"


def test_file_uri_path() -> None:
    assert file_uri_path("file:///var/lib/out%41#1 y") == "/var/lib/out%41#1 y"
    assert file_uri_path("/plain/dir") == "/plain/dir"


def _deliver(spool: Path, dest: Path, names: list[str]) -> Delivery:
    async def go() -> Delivery:
        d = Delivery(LocalDestination(f"file://{dest}"))
        d.start()
        for n in names:
            d.submit(str(spool / n), (spool / n).stat().st_size)
        assert await d.drain(10)
        await d.stop()
        return d

    return asyncio.run(go())


def test_same_filesystem_is_a_rename(tmp_path: Path) -> None:
    spool, dest = tmp_path / "spool", tmp_path / "out"
    spool.mkdir()
    (spool / NAME).write_bytes(b'{"a":1}\n')
    d = _deliver(spool, dest, [NAME])
    assert (dest / KEY).read_bytes() == b'{"a":1}\n'
    assert list(spool.iterdir()) == []
    assert d.stats()["files_delivered"] == 1 and d.stats()["files_waiting"] == 0


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second filesystem (tmpfs)")
def test_across_filesystems_copy_fsync_rename(tmp_path: Path) -> None:
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem here")
        (tmp_path / NAME).write_bytes(b"x\n" * 1000)
        _deliver(tmp_path, other, [NAME])
        assert (other / KEY).read_bytes() == b"x\n" * 1000
        assert not (tmp_path / NAME).exists()
        assert [p.name for p in (other / KEY).parent.iterdir()] == [Path(KEY).name]  # no temp left
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_a_failing_destination_keeps_the_file_and_retries(tmp_path: Path) -> None:
    """The destination directory is a file at first (delivery fails); once it is fixed, the
    same spool file is delivered, exactly once."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / NAME).write_bytes(b"1\n")
    dest = tmp_path / "out"
    dest.mkdir()
    blocker = dest / "ep"
    blocker.write_text("not a directory")

    async def go() -> dict[str, float | int]:
        d = Delivery(LocalDestination(f"file://{dest}"))
        d.RETRY_MIN_S = 0.05
        d.start()
        d.submit(str(spool / NAME), 2)
        await asyncio.sleep(0.3)
        stats = d.stats()
        assert (spool / NAME).exists() and stats["retries"] >= 1
        assert stats["failures"] == {"enotdir": stats["retries"]}
        blocker.unlink()
        assert await d.drain(10)
        await d.stop()
        return d.stats()

    stats = asyncio.run(go())
    assert (dest / KEY).read_bytes() == b"1\n"
    assert stats["files_delivered"] == 1 and stats["files_waiting"] == 0


def test_a_full_destination_is_counted_as_disk_full_and_retried(tmp_path: Path, small_fs: Any) -> None:
    """The destination is a 64 KiB filesystem (a tmpfs this test mounts) and the file is larger:
    the copy fails with ENOSPC, counted as `disk_full`, the file stays in the spool, no partial
    file is left behind; once the filesystem has room, the same file is delivered once."""
    import subprocess

    spool = tmp_path / "spool"
    spool.mkdir()
    dest = small_fs(tmp_path / "small", "64k")
    (spool / NAME).write_bytes(b"y" * 99 + b"\n" + b"x\n" * 100_000)

    async def go() -> dict[str, Any]:
        d = Delivery(LocalDestination(f"file://{dest}"))
        d.RETRY_MIN_S = 0.05
        d.start()
        d.submit(str(spool / NAME), (spool / NAME).stat().st_size)
        await asyncio.sleep(0.3)
        stats = d.stats()
        assert set(stats["failures"]) == {"disk_full"} and (spool / NAME).exists()
        assert not [p for p in dest.rglob("*") if p.is_file()]  # no half copy holds the space
        subprocess.run(["mount", "-o", "remount,size=1m", str(dest)], check=True)
        assert await d.drain(10)
        await d.stop()
        return d.stats()

    stats = asyncio.run(go())
    assert (dest / KEY).read_bytes().count(b"\n") == 100_001
    assert [p.name for p in (dest / KEY).parent.iterdir()] == [Path(KEY).name]
    assert stats["files_delivered"] == 1 and not (spool / NAME).exists()


def test_scan_spool_takes_only_its_endpoint(tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(b"1\n")
    (tmp_path / ("other-" + NAME)).write_bytes(b"1\n")
    (tmp_path / (NAME + ".part")).write_bytes(b"1\n")
    sealed, parts = scan_spool(str(tmp_path), "ep")
    assert [os.path.basename(p) for p, _ in sealed] == [NAME]
    assert [os.path.basename(p) for p in parts] == [NAME + ".part"]


def test_a_file_removed_from_the_spool_is_not_retried_forever(tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        d = Delivery(LocalDestination(f"file://{tmp_path / 'out'}"))
        d.start()
        d.submit(str(tmp_path / NAME), 2)  # never existed
        assert await d.drain(5)
        await d.stop()
        return d.stats()

    stats = asyncio.run(go())
    assert stats["failures"] == {"file_missing": 1} and stats["files_waiting"] == 0
