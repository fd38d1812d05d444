"""Nothing in the spool is followed through a symbolic link: links planted by a local user with
write access to the spool are left alone, their targets untouched, and never delivered."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.testing.daemon import DaemonProcess


def name(suffix: str) -> str:
    return f"test-endpoint.AllTraffic.2024-01-01-00.00-00-000-{uuid.uuid4()}{suffix}"


def test_links_planted_in_the_spool_are_left_alone(daemon_factory: Any, short_tmp: Path) -> None:
    """Links under an open and a sealed spool file's name (pointing at files whose last line has
    no newline, which recovery would cut) and at the journal: the daemon starts, says what it
    left alone, cuts and delivers nothing through them, and its own records arrive."""
    d: DaemonProcess = daemon_factory()
    d.write_config()
    d.spool_dir.mkdir(parents=True)
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    victims = {}
    for label, suffix in (("part", ".jsonl.part"), ("sealed", ".jsonl")):
        target = elsewhere / label
        target.write_bytes(b'{"not":"a capture"}\nno newline at the end')
        link = d.spool_dir / name(suffix)
        link.symlink_to(target)
        victims[link] = (target, target.read_bytes())
    journal_target = elsewhere / "journal"
    journal_target.write_bytes(b"keep me")
    (d.spool_dir / ".journal").symlink_to(journal_target)
    d.start()
    with CaptureClient(d.socket_path) as client:
        for i in range(5):
            assert client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
        assert client.flush(timeout=10)
    assert d.stop() == 0
    for link, (target, content) in victims.items():
        assert link.is_symlink() and target.read_bytes() == content
    assert journal_target.read_bytes() == b"keep me"
    assert not (d.spool_dir / ".journal").is_symlink()  # replaced by the daemon's own journal
    assert sorted(int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()) == list(range(5))
    assert d.log().count("is not a regular file") == 2


@pytest.mark.parametrize("dangling", [True, False], ids=["to-nowhere", "to-a-file"])
def test_a_link_at_the_lock_refuses_to_start_and_creates_nothing(
    daemon_factory: Any, short_tmp: Path, dangling: bool
) -> None:
    d: DaemonProcess = daemon_factory()
    d.write_config()
    d.spool_dir.mkdir(parents=True)
    target = short_tmp / "created-elsewhere"
    if not dangling:
        target.write_bytes(b"untouched")
    (d.spool_dir / ".lock").symlink_to(target)
    with pytest.raises(RuntimeError, match="is a symbolic link; refusing to use it"):
        d.start(timeout=15)
    assert target.exists() is not dangling
    if not dangling:
        assert target.read_bytes() == b"untouched"
    assert not os.path.exists(d.socket_path)
