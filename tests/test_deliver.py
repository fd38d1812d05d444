"""Delivery to a local destination: atomic appearance, across filesystems too, and retries."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from captured.delivery.local import LocalDestination, file_uri_path, local_error
from captured.delivery.queue import Delivery, DeliveryStats
from captured.errors import DeliveryError, LocalDeliveryError, UploadError
from captured.testing.delivery import running

NAME = "ep.AllTraffic.2021-05-18-00.28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl"
KEY = "ep/AllTraffic/2021/05/18/00/28-04-146-08d6d8b9-c7ac-4427-93a1-5eece415565d.jsonl"


def test_file_uri_path() -> None:
    assert file_uri_path("file:///var/lib/out%41#1 y") == "/var/lib/out%41#1 y"
    assert file_uri_path("/plain/dir") == "/plain/dir"


def _deliver(spool: Path, dest: Path, names: list[str]) -> Delivery:
    async def go() -> Delivery:
        d = Delivery(LocalDestination(f"file://{dest}"))
        async with running(d):
            for n in names:
                d.submit(str(spool / n), (spool / n).stat().st_size)
            assert await d.drain(10)
        return d

    return asyncio.run(go())


def test_same_filesystem_is_a_rename(tmp_path: Path) -> None:
    spool, dest = tmp_path / "spool", tmp_path / "out"
    spool.mkdir()
    (spool / NAME).write_bytes(b'{"a":1}\n')
    d = _deliver(spool, dest, [NAME])
    assert (dest / KEY).read_bytes() == b'{"a":1}\n'
    assert list(spool.iterdir()) == []
    assert d.statistics().files_delivered == 1 and d.statistics().files_waiting == 0


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

    async def go() -> DeliveryStats:
        d = Delivery(LocalDestination(f"file://{dest}"))
        d.RETRY_MIN_S = 0.05
        async with running(d):
            d.submit(str(spool / NAME), 2)
            await asyncio.sleep(0.3)
            stats = d.statistics()
            assert (spool / NAME).exists() and stats.retries >= 1
            assert stats.failures == {"enotdir": stats.retries}
            blocker.unlink()
            assert await d.drain(10)
        return d.statistics()

    stats = asyncio.run(go())
    assert (dest / KEY).read_bytes() == b"1\n"
    assert stats.files_delivered == 1 and stats.files_waiting == 0


def test_a_full_destination_is_counted_as_disk_full_and_retried(tmp_path: Path, small_fs: Any) -> None:
    """The destination is a 64 KiB filesystem (a tmpfs this test mounts) and the file is larger:
    the copy fails with ENOSPC, counted as `disk_full`, the file stays in the spool, no partial
    file is left behind; once the filesystem has room, the same file is delivered once."""
    import subprocess

    spool = tmp_path / "spool"
    spool.mkdir()
    dest = small_fs(tmp_path / "small", "64k")
    (spool / NAME).write_bytes(b"y" * 99 + b"\n" + b"x\n" * 100_000)

    async def go() -> DeliveryStats:
        d = Delivery(LocalDestination(f"file://{dest}"))
        d.RETRY_MIN_S = 0.05
        async with running(d):
            d.submit(str(spool / NAME), (spool / NAME).stat().st_size)
            await asyncio.sleep(0.3)
            stats = d.statistics()
            assert set(stats.failures) == {"disk_full"} and (spool / NAME).exists()
            assert not [p for p in dest.rglob("*") if p.is_file()]  # no half copy holds the space
            subprocess.run(["mount", "-o", "remount,size=1m", str(dest)], check=True)
            assert await d.drain(10)
        return d.statistics()

    stats = asyncio.run(go())
    assert (dest / KEY).read_bytes().count(b"\n") == 100_001
    assert [p.name for p in (dest / KEY).parent.iterdir()] == [Path(KEY).name]
    assert stats.files_delivered == 1 and not (spool / NAME).exists()


def test_a_file_removed_from_the_spool_is_not_retried_forever(tmp_path: Path) -> None:
    async def go() -> DeliveryStats:
        d = Delivery(LocalDestination(f"file://{tmp_path / 'out'}"))
        async with running(d):
            d.submit(str(tmp_path / NAME), 2)  # never existed
            assert await d.drain(5)
        return d.statistics()

    stats = asyncio.run(go())
    assert stats.failures == {"file_missing": 1} and stats.files_waiting == 0


class ScriptedDestination:
    """A destination whose `put` raises each of `errors` in turn, then succeeds."""

    uri = "test://"

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.puts: list[float] = []  # when each attempt was made (monotonic)

    async def start(self) -> None:
        return None

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        self.puts.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)

    async def tidy(self, own_prefix: str, waiting: Any) -> None:
        return None

    async def close(self) -> None:
        return None


def test_a_delivery_error_is_counted_by_cause_and_anything_else_as_an_internal_bug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination fails with an `UploadError` (timeout, retryable), then twice with a
    KeyError (a bug: no `DeliveryError`), then succeeds. The first is counted under its cause and
    tried again soon; the bugs are counted as `internal`, tried again only after the fatal retry
    interval, and logged with a traceback once. The file is delivered once in the end."""
    (tmp_path / NAME).write_bytes(b"1\n")
    timeout = UploadError(cause="timeout", retryable=True, message="read timed out")
    dest = ScriptedDestination([timeout, KeyError("bug"), KeyError("bug")])

    async def go() -> DeliveryStats:
        d = Delivery(dest, fatal_retry_s=0.3)
        d.RETRY_MIN_S = 0.01
        async with running(d):
            d.submit(str(tmp_path / NAME), 2)
            assert await d.drain(10)
        return d.statistics()

    with caplog.at_level(logging.WARNING, logger="captured.deliver"):
        stats = asyncio.run(go())
    assert stats.failures == {"timeout": 1, "internal": 2} and stats.files_delivered == 1
    assert not (tmp_path / NAME).exists()
    assert len(dest.puts) == 4
    assert dest.puts[2] - dest.puts[1] >= 0.3 and dest.puts[3] - dest.puts[2] >= 0.3  # slowly
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info is not None
    assert tracebacks[0].exc_info[0] is KeyError and "internal" in tracebacks[0].getMessage()
    assert any("(timeout)" in r.getMessage() and not r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    ("exc", "cause", "retryable"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full", True),
        (OSError(errno.EACCES, "Permission denied"), "access_denied", False),
        (OSError(errno.EROFS, "Read-only file system"), "read_only_filesystem", False),
        (OSError(errno.ENOTDIR, "Not a directory"), "enotdir", True),
        (OSError("no errno"), "os_error", True),
    ],
)
def test_a_failed_local_delivery_is_named_after_its_errno(exc: OSError, cause: str, retryable: bool) -> None:
    err = local_error(exc)
    assert type(err) is LocalDeliveryError and isinstance(err, DeliveryError)
    assert (err.cause, err.retryable, str(err)) == (cause, retryable, str(exc))


def test_drain_gives_up_once_no_waiting_file_can_be_tried_again_before_the_deadline(tmp_path: Path) -> None:
    """Shutdown with a file whose failure is fatal (retried every minute): with a 30 s deadline,
    waiting cannot deliver it, so `drain` says False at once instead of holding the stop for 30 s.
    The file stays queued and in the spool. A retryable failure due before the deadline is
    still waited for (and then delivered)."""
    (tmp_path / NAME).write_bytes(b"1\n")
    denied = UploadError(cause="access_denied", retryable=False, message="403")

    async def fatal() -> tuple[bool, float, DeliveryStats]:
        d = Delivery(ScriptedDestination([denied]), fatal_retry_s=60)
        async with running(d):
            d.submit(str(tmp_path / NAME), 2)
            t0 = time.monotonic()
            drained = await d.drain(30)
            return drained, time.monotonic() - t0, d.statistics()

    drained, waited, stats = asyncio.run(fatal())
    assert not drained and waited < 15  # not the whole 30 s
    assert stats.failures == {"access_denied": 1} and stats.files_waiting == 1
    assert (tmp_path / NAME).exists()

    timeout = UploadError(cause="timeout", retryable=True, message="read timed out")

    async def retryable() -> tuple[bool, DeliveryStats]:
        d = Delivery(ScriptedDestination([timeout]))
        d.RETRY_MIN_S = 0.2
        async with running(d):
            d.submit(str(tmp_path / NAME), 2)
            return await d.drain(30), d.statistics()

    drained, stats = asyncio.run(retryable())
    assert drained and stats.files_delivered == 1 and stats.failures == {"timeout": 1}
