"""A real `captured serve` subprocess for tests, and small helpers for talking to it.

`DaemonProcess(root)` writes a config under `root` (its socket, spool and a `file://`
destination), starts `python -m captured serve` on it and waits until the socket answers a
STATUS request; `stop()` signals it and waits. Keep `root` short: AF_UNIX socket paths are
limited to 107 bytes, so a directory made with `tempfile.mkdtemp(dir="/tmp")` fits where a
deep temporary directory may not.

    d = DaemonProcess(root).start()
    try:
        with CaptureClient(d.socket_path) as client:
            ...
    finally:
        d.stop()
    wait_for(lambda: d.delivered_lines())
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from captured.service.cli import query_status
from captured.wire import frames

T = TypeVar("T")

#: The `[DataCaptureConfig]` a `DaemonProcess` gets unless `write_config` is given another:
#: 100 % sampling, Input and Output, CSV and JSON content types. `{out_dir}` is filled in.
DEFAULT_DATA_CAPTURE = (
    "[DataCaptureConfig]\n"
    "InitialSamplingPercentage = 100\n"
    'DestinationS3Uri = "file://{out_dir}"\n'
    'CaptureOptions = [{{ CaptureMode = "Input" }}, {{ CaptureMode = "Output" }}]\n'
    "[DataCaptureConfig.CaptureContentTypeHeader]\n"
    'CsvContentTypes = ["text/csv"]\n'
    'JsonContentTypes = ["application/json", "application/jsonlines"]\n'
)


class DaemonProcess:
    """One daemon subprocess with its own socket, spool and file:// destination under `root`.

    `extra_toml` goes into the config file before `[DataCaptureConfig]`; `args` are appended to
    the `captured serve` command line; `env` replaces the child's environment (None: inherit).
    Also a context manager: `with DaemonProcess(root) as d:` starts it and stops it (SIGTERM).
    """

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
        self.preexec: Callable[[], Any] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.stop()

    def write_config(self, data_capture: str | None = None) -> None:
        """Write the config file; `data_capture` replaces the default `[DataCaptureConfig]` text."""
        dcc = data_capture or DEFAULT_DATA_CAPTURE.format(out_dir=self.out_dir)
        self.config_path.write_text(
            'endpoint_name = "test-endpoint"\n'
            'variant_name = "AllTraffic"\n'
            f'socket_path = "{self.socket_path}"\n'
            f'spool_dir = "{self.spool_dir}"\n' + self.extra_toml + "\n" + dcc
        )

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        """Start the daemon (writing the default config first if there is none) and wait until
        its socket answers; raise RuntimeError with its log if it exits or never answers."""
        if not self.config_path.exists():
            self.write_config()
        cmd = [sys.executable, "-m", "captured", "serve", "--config", str(self.config_path), *self.args]
        self._close_log()  # a restart without stop() after the daemon exited by itself
        self._log = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stderr=self._log, stdout=self._log, env=self.env, preexec_fn=self.preexec
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                query_status(self.socket_path, timeout=1.0)
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"daemon did not become ready:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        """The daemon's STATUS answer."""
        return query_status(self.socket_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` (if still running), wait up to `timeout` (then SIGKILL); the exit code.
        Call it also for a daemon that exited by itself: it closes the log file."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """What the daemon wrote to stdout and stderr so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def delivered_files(self) -> list[Path]:
        """The JSON Lines files delivered to the `file://` destination, sorted."""
        return sorted(p for p in self.out_dir.rglob("*.jsonl")) if self.out_dir.exists() else []

    def delivered_lines(self) -> list[dict[str, Any]]:
        """Every delivered line, parsed."""
        return [json.loads(line) for p in self.delivered_files() for line in p.read_text().splitlines()]

    def delivered_bytes(self) -> bytes:
        """The delivered files' bytes, concatenated in sorted order."""
        return b"".join(p.read_bytes() for p in self.delivered_files())


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


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `predicate` every `interval` seconds until it returns a true value, and return that
    value; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
