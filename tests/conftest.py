"""Fixtures: a real `captured serve` subprocess on a short temporary socket path (the helpers
themselves are in `captured.testing`), and a small real filesystem that fills."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captured.testing.daemon import DaemonProcess

# A real S3-compatible server (moto, in a child process) and fault proxies: see s3fixtures.py.
pytest_plugins = ["s3fixtures"]


@pytest.fixture
def small_fs() -> Iterator[Any]:
    """`small_fs(path, size)`: mount a tmpfs of `size` (mount's syntax: "64m") at `path`, a real
    filesystem that fills; unmounted at the end. Skips the test where it cannot mount (not root,
    no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        if os.getuid() != 0:
            pytest.skip("mounts a small tmpfs: needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[Any]:
    """Make (not start) daemons; every one still running at the end is stopped."""
    made: list[DaemonProcess] = []

    def make(
        extra_toml: str = "", args: tuple[str, ...] = (), name: str = "d", env: dict[str, str] | None = None
    ) -> DaemonProcess:
        root = short_tmp / name
        root.mkdir(exist_ok=True)
        d = DaemonProcess(root, extra_toml, args, env)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None:
            d.stop(signal.SIGKILL)  # also closes the log of a daemon that exited by itself


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonProcess:
    """A running daemon: 100 % sampling, Input and Output, CSV and JSON content types."""
    d: DaemonProcess = daemon_factory()
    return d.start()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
