"""The two systems under test as subprocesses: start, ask how far they got, stop, count output lines.

Each server lives in its own temporary directory. The socket always sits in a short directory under
/tmp (AF_UNIX paths are limited to 107 bytes); data may go elsewhere (`--workdir`).
"""

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
from pathlib import Path
from typing import Any

import zstandard

from captured.service.cli import query_status

BENCH_DIR = Path(__file__).resolve().parent
STOP_TIMEOUT_S = 120.0
#: captured seals (rotates) a spool file at least this often.
MAX_FILE_AGE_S = 60.0


class Server:
    """Common lifecycle; subclasses say how to start, how to count and where the output is."""

    name = ""

    def __init__(self, sampling: int, workdir: str | None, env: dict[str, str] | None = None) -> None:
        self.sampling = sampling
        self.env = {**os.environ, **(env or {})}
        self.sock_dir = tempfile.mkdtemp(prefix="cdb-", dir="/tmp")
        self.data_dir = self.sock_dir
        if workdir:
            self.data_dir = tempfile.mkdtemp(prefix=f"cdb-{self.name}-", dir=workdir)
        self.socket_path = os.path.join(self.sock_dir, "s.sock")
        self.out_dir = os.path.join(self.data_dir, "out")
        self.log_path = os.path.join(self.data_dir, f"{self.name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """(received, written, dropped by reason) as the server reports them."""
        raise NotImplementedError

    def output_dirs(self) -> list[str]:
        return [self.out_dir]

    def snapshot(self) -> dict[str, Any]:
        """Extra state worth reporting at the moment the clock stops (none by default)."""
        return {}

    def start(self, timeout_s: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=log, cwd=self.data_dir, env=self.env
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_rss_bytes(self) -> int:
        """VmHWM: the resident set's high-water mark since the process started."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")

    def minor_faults(self) -> int:
        """Minor page faults of the server so far (field 10 of /proc/<pid>/stat)."""
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[7])

    def stop(self) -> int:
        """SIGTERM, wait for an orderly exit (SIGKILL after `STOP_TIMEOUT_S`)."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def count_lines(self) -> tuple[int, int]:
        """(lines, files) in every output file; the first line of each file must be a capture record."""
        lines = files = 0
        for root in self.output_dirs():
            for dirpath, _, names in os.walk(root):
                for name in names:
                    if ".jsonl" not in name:
                        continue
                    files += 1
                    lines += _count_file(os.path.join(dirpath, name))
        return lines, files

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def prewarm(self, nbytes: int) -> None:
        """Write and delete `nbytes` of scratch data where the output will go.

        On a virtual machine the first write into guest memory that was never touched costs
        several times more than a write into pages freed a moment ago (measured: 600 MB in 1.7 s
        versus 0.15 s). Without this, whichever system runs first on a fresh machine pays that.
        """
        path = os.path.join(self.data_dir, "prewarm.tmp")
        chunk = b"\0" * (1 << 20)
        with open(path, "wb") as fh:
            for _ in range(0, nbytes, len(chunk)):
                fh.write(chunk)
        os.unlink(path)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _count_file(path: str) -> int:
    n = 0
    if path.endswith(".zst"):
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as fh:
            first = b""
            while chunk := fh.read(1 << 20):
                first = first or chunk.split(b"\n", 1)[0]
                n += chunk.count(b"\n")
        _check_first_line(first, path)
        return n
    with open(path, "rb") as fh:
        first = fh.readline()
        if first:
            _check_first_line(first, path)
            n = first.count(b"\n")
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def _check_first_line(first: bytes, where: str) -> None:
    doc = json.loads(first)
    if "captureData" not in doc or "eventId" not in doc["eventMetadata"]:
        raise ValueError(f"{where}: the first line is not a capture record")


class CapturedServer(Server):
    name = "captured"
    #: `[spool] fsync_interval_s`; None: the daemon's default.
    fsync_interval_s: float | None = None
    #: Endpoints configured (`bench-0` ...; one: the single-endpoint form, `bench`).
    endpoints = 1
    #: `[delivery] compression`.
    compression = "none"

    def __init__(self, sampling: int, workdir: str | None, env: dict[str, str] | None = None) -> None:
        super().__init__(sampling, workdir, env)
        self.spool_dir = os.path.join(self.data_dir, "spool")
        self.config_path = os.path.join(self.data_dir, "captured.toml")
        with open(self.config_path, "w") as fh:
            fh.write(self.config_toml())

    def destination(self) -> str:
        return f"file://{self.out_dir}"

    def extra_toml(self) -> str:
        return ""

    def endpoint_names(self) -> list[str]:
        """What the senders name, sender i the (i mod n)-th; [None]: the single endpoint."""
        return [f"bench-{i}" for i in range(self.endpoints)] if self.endpoints > 1 else [None]  # type: ignore[list-item]

    def config_toml(self) -> str:
        capture = (
            f"InitialSamplingPercentage = {self.sampling}\n"
            f'DestinationS3Uri = "{self.destination()}"\n'
            'CaptureOptions = [{ CaptureMode = "Input" }, { CaptureMode = "Output" }]\n'
        )
        types = 'CsvContentTypes = ["text/csv"]\nJsonContentTypes = ["application/json"]\n'
        if self.endpoints == 1:
            endpoints = (
                'endpoint_name = "bench"\nvariant_name = "AllTraffic"\n'
                f"\n[DataCaptureConfig]\n{capture}\n[DataCaptureConfig.CaptureContentTypeHeader]\n{types}"
            )
        else:
            endpoints = "".join(
                f'\n[[endpoints]]\nendpoint_name = "{name}"\n[endpoints.DataCaptureConfig]\n{capture}'
                f"[endpoints.DataCaptureConfig.CaptureContentTypeHeader]\n{types}"
                for name in self.endpoint_names()
            )
        return (
            f'socket_path = "{self.socket_path}"\n'
            f'spool_dir = "{self.spool_dir}"\n' + endpoints + "\n[spool]\n"
            f"max_file_age_s = {MAX_FILE_AGE_S}\n"
            + (f"fsync_interval_s = {self.fsync_interval_s}\n" if self.fsync_interval_s is not None else "")
            + f'\n[delivery]\ncompression = "{self.compression}"\n'
            + self.extra_toml()
        )

    def command(self) -> list[str]:
        return [sys.executable, "-m", "captured", "serve", "--config", self.config_path]

    def ready(self) -> bool:
        try:
            query_status(self.socket_path, timeout=1.0)
        except OSError:
            return False
        return True

    def counts(self) -> tuple[int, int, dict[str, int]]:
        c = query_status(self.socket_path)["counters"]
        return c["received"], c["written"], dict(c["dropped"])

    def output_dirs(self) -> list[str]:
        return [self.spool_dir, self.out_dir]

    def snapshot(self) -> dict[str, Any]:
        st = query_status(self.socket_path)
        d = st["delivery"]
        out = {"files_delivered": d["files_delivered"], "bytes_delivered": d["bytes_delivered"]}
        if st.get("compression"):
            out["compression_cpu_s"] = st["compression"]["cpu_s"]  # files compressed so far, in the daemon
        return out


class CapturedS3Server(CapturedServer):
    """`captured` delivering to a bucket on a local S3-compatible server.

    The bench sets `CapturedS3Server.moto` (a started `captured.testing.s3.MotoServer`)
    before the first run; each run resets it, so a run counts only its own objects.
    """

    name = "captured-s3"
    bucket = "bench-ingest"
    moto: Any = None
    #: `[s3] uploader_nice`; None: the default.
    uploader_nice: int | None = None

    def __init__(self, sampling: int, workdir: str | None, env: dict[str, str] | None = None) -> None:
        super().__init__(sampling, workdir, {**self.moto.aws_env(), **(env or {})})
        self.s3_client = self.moto.boto3_client()

    def destination(self) -> str:
        return f"s3://{self.bucket}/captures"

    def extra_toml(self) -> str:
        # Uploads may finish after the clock stops: SIGTERM waits for them so the count sees all.
        return (
            f'\n[s3]\nendpoint_url = "{self.moto.endpoint_url}"\nregion = "us-east-1"\n'
            f"shutdown_timeout_s = {STOP_TIMEOUT_S / 2:.0f}\n"
            + (f"uploader_nice = {self.uploader_nice}\n" if self.uploader_nice is not None else "")
        )

    def start(self, timeout_s: float = 30.0) -> None:
        self.moto.reset()
        self.s3_client.create_bucket(Bucket=self.bucket)
        super().start(timeout_s)

    def count_lines(self) -> tuple[int, int]:
        """Lines left in the spool plus lines in every object of the bucket."""
        lines, files = super().count_lines()
        for page in self.s3_client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                body = self.s3_client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                first = b""
                for chunk in body.iter_chunks(1 << 20):
                    first = first or chunk.split(b"\n", 1)[0]
                    lines += chunk.count(b"\n")
                _check_first_line(first, obj["Key"])
                files += 1
        return lines, files


class NaiveServer(Server):
    name = "naive"

    def command(self) -> list[str]:
        script = str(BENCH_DIR / "naive_server.py")
        return [sys.executable, script, "--socket", self.socket_path, "--out-dir", self.out_dir,
                "--sampling", str(self.sampling)]  # fmt: skip

    def ready(self) -> bool:
        return os.path.exists(self.socket_path) and "ready" in self.log_tail(5)

    def counts(self) -> tuple[int, int, dict[str, int]]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            sock.connect(self.socket_path)
            sock.sendall(b'{"op": "count"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("the naive server closed the connection without answering")
                reply += data
        doc = json.loads(reply)
        received, written = doc["received"], doc["written"]
        dropped = {"sampled_out": received - written} if received > written else {}
        return received, written, dropped


class CapturedIdleLoadServer(CapturedServer):
    """`captured` with a file destination while a busy loop runs at SCHED_IDLE priority.

    The control for `captured-s3`: the scheduler gives an idle-priority process only CPU time
    nobody else wants, yet on a small virtual machine its mere activity slows the others. This
    shows how much of the S3 case's loss a background process costs by itself.
    """

    name = "captured-idle-load"

    def start(self, timeout_s: float = 30.0) -> None:
        self.burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setscheduler(self.burner.pid, os.SCHED_IDLE, os.sched_param(0))
        super().start(timeout_s)

    def cleanup(self) -> None:
        burner = getattr(self, "burner", None)
        if burner is not None and burner.poll() is None:
            burner.kill()
            burner.wait()
        super().cleanup()


class CapturedEndpointsServer(CapturedServer):
    """`captured` serving several endpoints (`--endpoints N`), sender i naming bench-(i mod N)."""

    name = "captured-endpoints"


class CapturedZstdServer(CapturedServer):
    """`captured` delivering zstd-compressed objects (`--compression zstd`)."""

    name = "captured-zstd"
    compression = "zstd"
    #: `[delivery] compression_level`: the daemon's default.
    compression_level = 3


SYSTEMS: dict[str, type[Server]] = {
    "captured": CapturedServer,
    "captured-endpoints": CapturedEndpointsServer,
    "captured-zstd": CapturedZstdServer,
    "captured-s3": CapturedS3Server,
    "captured-idle-load": CapturedIdleLoadServer,
    "naive": NaiveServer,
}
