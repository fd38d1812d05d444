"""Fixtures: a real `captured serve` subprocess on a short temporary socket path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captured.service.cli import query_status
from captured.service.config import CaptureContentTypeHeader, CaptureOption, DataCaptureConfig
from captured.wire import frames

# A real S3-compatible server (moto, in a child process) and a fault proxy: see s3fixtures.py.
pytest_plugins = ["s3fixtures"]


class DaemonProcess:
    """One daemon subprocess with its own socket, spool and file:// destination."""

    def __init__(
        self, root: Path, extra_toml: str = "", args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.env = env
        self.root = root
        self.socket_path = str(root / "c.sock")
        self.spool_dir = root / "spool"
        self.out_dir = root / "out"
        self.config_path = root / "captured.toml"
        self.extra_toml = extra_toml
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = root / "daemon.log"
        #: Runs in the child before exec (resource limits for a test).
        self.preexec: Any = None

    def write_config(self, data_capture: str | None = None) -> None:
        dcc = data_capture or (
            "[DataCaptureConfig]\n"
            "InitialSamplingPercentage = 100\n"
            f'DestinationS3Uri = "file://{self.out_dir}"\n'
            'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
            "[DataCaptureConfig.CaptureContentTypeHeader]\n"
            'CsvContentTypes = ["text/csv"]\n'
            'JsonContentTypes = ["application/json", "application/jsonlines"]\n'
        )
        self.config_path.write_text(
            'endpoint_name = "test-endpoint"\n'
            'variant_name = "AllTraffic"\n'
            f'socket_path = "{self.socket_path}"\n'
            f'spool_dir = "{self.spool_dir}"\n' + self.extra_toml + "\n" + dcc
        )

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        if not self.config_path.exists():
            self.write_config()
        cmd = [sys.executable, "-m", "captured", "serve", "--config", str(self.config_path), *self.args]
        self._log = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stderr=self._log, stdout=self._log, env=self.env, preexec_fn=self.preexec
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                query_status(self.socket_path, timeout=1.0)
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"daemon did not become ready:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        return query_status(self.socket_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def delivered_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*.jsonl")) if self.out_dir.exists() else []

    def delivered_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for p in self.delivered_files() for line in p.read_text().splitlines()]

    def delivered_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.delivered_files())


def dcc(
    csv: tuple[str, ...] | None = ("text/csv",),
    js: tuple[str, ...] | None = ("application/json",),
    modes: tuple[str, ...] = ("Input", "Output"),
    header: bool = True,
) -> DataCaptureConfig:
    """A DataCaptureConfig for encoder tests: 100 %, these capture modes and content types."""
    return DataCaptureConfig(
        InitialSamplingPercentage=100,
        DestinationS3Uri="file:///tmp/out",
        CaptureOptions=tuple(CaptureOption(m) for m in modes),
        CaptureContentTypeHeader=CaptureContentTypeHeader(csv, js) if header else None,
    )


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
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@pytest.fixture
def daemon(daemon_factory: Any) -> DaemonProcess:
    """A running daemon: 100 % sampling, Input and Output, CSV and JSON content types."""
    d: DaemonProcess = daemon_factory()
    return d.start()


def read_error(s: socket.socket, timeout: float = 10.0) -> str:
    """The text of the daemon's ERROR frame on `s`, or "" if the connection closed without one."""
    s.settimeout(timeout)
    reader = frames.FrameReader()
    while True:
        data = s.recv(65536)
        if not data:
            return ""
        for kind, payload in reader.feed(data):
            if kind == frames.Kind.ERROR:
                return bytes(payload).decode()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
