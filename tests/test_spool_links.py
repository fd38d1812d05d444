"""Nothing in the spool is followed through a symbolic link: links planted by a local user with
write access to the spool are left alone, their targets untouched, and never delivered. The
daemon runs in the test's event loop (`captured.testing.inprocess`); what it says is read from
its loggers."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

import pytest

from captured.client.aio import AsyncCaptureClient
from captured.testing.inprocess import FakeClock, delivered_lines, run_daemon, write_config


def name(suffix: str) -> str:
    return f"test-endpoint.AllTraffic.2024-01-01-00.00-00-000-{uuid.uuid4()}{suffix}"


def test_links_planted_in_the_spool_are_left_alone(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Links under an open and a sealed spool file's name (pointing at files whose last line has
    no newline, which recovery would cut) and at the journal: the daemon starts, says what it
    left alone, cuts and delivers nothing through them, and its own records arrive."""
    root = short_tmp / "d"
    root.mkdir()
    cfg = write_config(root)
    spool_dir = Path(cfg.spool_dir)
    spool_dir.mkdir(parents=True)
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    victims = {}
    for label, suffix in (("part", ".jsonl.part"), ("sealed", ".jsonl")):
        target = elsewhere / label
        target.write_bytes(b'{"not":"a capture"}\nno newline at the end')
        link = spool_dir / name(suffix)
        link.symlink_to(target)
        victims[link] = (target, target.read_bytes())
    journal_target = elsewhere / "journal"
    journal_target.write_bytes(b"keep me")
    (spool_dir / ".journal").symlink_to(journal_target)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()), AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(5):
                assert client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
            assert await client.flush(timeout=10)

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    for link, (target, content) in victims.items():
        assert link.is_symlink() and target.read_bytes() == content
    assert journal_target.read_bytes() == b"keep me"
    assert not (spool_dir / ".journal").is_symlink()  # replaced by the daemon's own journal
    assert sorted(int(r["eventMetadata"]["inferenceId"]) for r in delivered_lines(root)) == list(range(5))
    assert caplog.text.count("is not a regular file") == 2


@pytest.mark.parametrize("dangling", [True, False], ids=["to-nowhere", "to-a-file"])
def test_a_link_at_the_lock_refuses_to_start_and_creates_nothing(
    short_tmp: Path, caplog: pytest.LogCaptureFixture, dangling: bool
) -> None:
    root = short_tmp / "d"
    root.mkdir()
    cfg = write_config(root)
    spool_dir = Path(cfg.spool_dir)
    spool_dir.mkdir(parents=True)
    target = short_tmp / "created-elsewhere"
    if not dangling:
        target.write_bytes(b"untouched")
    (spool_dir / ".lock").symlink_to(target)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            pass

    with (
        caplog.at_level(logging.INFO, logger="captured"),
        pytest.raises(RuntimeError, match="exited with 1 before it was ready"),
    ):
        asyncio.run(main())
    assert "is a symbolic link; refusing to use it" in caplog.text
    assert target.exists() is not dangling
    if not dangling:
        assert target.read_bytes() == b"untouched"
    assert not os.path.exists(cfg.socket_path)
