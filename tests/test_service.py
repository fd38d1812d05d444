"""Running as a service: live reload on SIGHUP, sd_notify and the watchdog, socket activation.

Reloads run on a daemon in the test's own event loop (`captured.testing.inprocess`):
`daemon.reload()` is what its SIGHUP handler calls, reading the config file again as `serve`
does. sd_notify (with SIGHUP and SIGTERM sent to the process) and socket activation keep a
subprocess daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.errors import ConfigError
from captured.service.cli import query_status
from captured.service.config import Config, load_config
from captured.service.daemon import Daemon
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.inprocess import (
    FakeClock,
    delivered_lines,
    eventually,
    run_daemon,
    status_doc,
    write_config,
)
from captured.wire import frames

DCC = """[DataCaptureConfig]
InitialSamplingPercentage = {pct}
DestinationS3Uri = "file://{out}"
CaptureOptions = [{{ CaptureMode = "Input" }}, {{ CaptureMode = "Output" }}]
[DataCaptureConfig.CaptureContentTypeHeader]
CsvContentTypes = ["text/csv"]
"""


def set_sampling(d: DaemonProcess, pct: int) -> None:
    d.write_config(DCC.format(pct=pct, out=d.out_dir))


def sampling_config(root: Path, pct: int) -> Config:
    """`set_sampling` for an in-process daemon under `root`: the config file written, and loaded."""
    return write_config(root, data_capture=DCC.format(pct=pct, out=root / "out"))


def serve_reload(cfg: Config) -> Callable[[], Config]:
    """What `serve` gives the daemon to read on SIGHUP: the same file again, each problem of a
    file it refuses logged (`captured.service.cli.cmd_serve`'s `reload`)."""
    config_file = Path(cfg.socket_path).parent / "captured.toml"  # (`write_config`'s layout)

    def reload() -> Config:
        try:
            return load_config(str(config_file))
        except ConfigError as err:
            for problem in err.problems:
                logging.getLogger("captured.daemon").error("reload refused: %s", problem)
            raise

    return reload


def daemon_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the in-process daemon logged (not a client in this process)."""
    return "".join(f"{r.getMessage()}\n" for r in caplog.records if not r.name.startswith("captured.client"))


def reload_and_check(daemon: Daemon, caplog: pytest.LogCaptureFixture, marker: str) -> None:
    """SIGHUP's work (`daemon.reload()`, which returns once it is done), and the log says `marker`
    once more than before."""
    seen = daemon_log(caplog).count(marker)
    daemon.reload()
    assert daemon_log(caplog).count(marker) > seen, daemon_log(caplog)


def test_sighup_switches_sampling_mid_stream_without_losing_a_record_or_a_connection(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client streams records while sampling goes 100 -> 0 -> 100 by SIGHUP: every record
    sent is either written or sampled_out, none twice, records sent at 0 % are all dropped, and
    the client's one connection stays open throughout (no status query runs meanwhile)."""
    cfg = sampling_config(short_tmp, 100)
    phase = {"pct": 100}
    sent_at: dict[int, int] = {}
    stop = threading.Event()

    def stream(client: CaptureClient) -> None:  # a model server's thread; the daemon runs on the loop
        i = 0
        while not stop.is_set():
            if client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i)):
                sent_at[i] = phase["pct"]
            i += 1
            if i % 100 == 0:
                time.sleep(0.005)
        assert client.flush(timeout=10)

    async def switch(daemon: Daemon, client: CaptureClient, pct: int) -> None:
        sampling_config(short_tmp, pct)
        phase["pct"] = -1  # switching: either outcome is right for these
        # What was captured before is at the daemon now (waited for, rather than for a while).
        st = client.stats()
        taken = st["captured"] - sum(st["dropped"].values())
        await eventually(lambda: status_doc(daemon)["counters"]["received"] >= taken)
        reload_and_check(daemon, caplog, "reload: applied")
        phase["pct"] = pct

    async def main() -> tuple[dict[str, Any], int]:
        async with run_daemon(cfg, clock=FakeClock(), reload=serve_reload(cfg)) as daemon:
            before = status_doc(daemon)["ingest"]["connections_total"]
            client = CaptureClient(cfg.socket_path)
            streaming = asyncio.create_task(asyncio.to_thread(stream, client))
            try:
                await asyncio.sleep(0.3)
                await switch(daemon, client, 0)
                await asyncio.sleep(0.3)
                await switch(daemon, client, 100)
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.wait_for(streaming, 30)
                await asyncio.to_thread(client.close)
            return status_doc(daemon), before

    with caplog.at_level(logging.INFO, logger="captured"):
        st, before = asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert st["ingest"]["connections_total"] == before + 1  # the stream's (status_doc is no query)
    c = st["counters"]
    assert c["received"] == len(sent_at) and c["written"] + c["dropped"]["sampled_out"] == c["received"]
    written = [int(line["eventMetadata"]["inferenceId"]) for line in delivered_lines(short_tmp)]
    assert len(written) == len(set(written)) == c["written"]
    assert all(sent_at[i] != 0 for i in written)  # nothing sent at 0 % was written
    kept = set(written)
    assert all(i in kept for i, pct in sent_at.items() if pct == 100)
    assert sum(1 for pct in sent_at.values() if pct == 0) > 0


def test_an_invalid_or_restart_only_change_on_sighup_changes_nothing(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = sampling_config(short_tmp, 100)
    config_file = short_tmp / "captured.toml"

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock(), reload=serve_reload(cfg)) as daemon:
            good = config_file.read_text()
            config_file.write_text(
                good.replace("InitialSamplingPercentage = 100", "InitialSamplingPercentage = 150")
            )
            reload_and_check(daemon, caplog, "reload refused")
            assert "InitialSamplingPercentage = 150" in daemon_log(caplog)
            config_file.write_text(
                good.replace("InitialSamplingPercentage = 100", "InitialSamplingPercentage = 10")
            )
            config_file.write_text(
                config_file.read_text().replace('variant_name = "AllTraffic"', 'variant_name = "Other"')
            )
            reload_and_check(daemon, caplog, "reload refused")
            assert "variant_name cannot change without a restart" in daemon_log(caplog)
            st = status_doc(daemon)
            assert st["CurrentSamplingPercentage"] == 100 and st["VariantName"] == "AllTraffic"
            config_file.write_text(good)
            reload_and_check(daemon, caplog, "the configuration is unchanged")

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; collects what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, until: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def kinds(self) -> list[str]:
        order = ("READY", "RELOADING", "STOPPING", "WATCHDOG")
        return [k for _, m in self.messages for k in order if k in m]


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[NotifyListener]:
    """A NotifyListener at <short_tmp>/notify, closed afterwards."""
    listener = NotifyListener(short_tmp / "notify")
    try:
        yield listener
    finally:
        listener.sock.close()


def test_sd_notify_ready_status_watchdog_reloading_stopping(
    daemon_factory: Any, listener: NotifyListener
) -> None:
    """Against a datagram socket given as NOTIFY_SOCKET: READY=1 (with a STATUS line) only once
    the socket answers, WATCHDOG=1 at a third of WATCHDOG_USEC, RELOADING=1 then READY=1 around
    a SIGHUP, STOPPING=1 on SIGTERM."""
    # (systemd also sets WATCHDOG_PID to the main pid; without it the daemon takes the interval)
    env = {**os.environ, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "600000"}
    d: DaemonProcess = daemon_factory(env=env)
    set_sampling(d, 100)
    d.start()
    listener.collect(lambda: "READY" in listener.kinds())
    (ready,) = [m for _, m in listener.messages if "READY" in m]
    assert ready["STATUS"].startswith("capture Started, sampling 100%")
    listener.collect(lambda: listener.kinds().count("WATCHDOG") >= 3, timeout=5)
    pings = [t for t, m in listener.messages if "WATCHDOG" in m]
    assert len(pings) >= 3
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    listener.collect(lambda: listener.kinds().count("READY") >= 2)
    assert [k for k in listener.kinds() if k != "WATCHDOG"] == ["READY", "RELOADING", "READY"]
    (reloading,) = [m for _, m in listener.messages if "RELOADING" in m]
    assert int(reloading["MONOTONIC_USEC"]) > 0
    d.proc.send_signal(signal.SIGTERM)
    listener.collect(lambda: "STOPPING" in listener.kinds())
    assert d.proc.wait(30) == 0
    assert [k for k in listener.kinds() if k != "WATCHDOG"] == ["READY", "RELOADING", "READY", "STOPPING"]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation_with_systemd_socket_activate(daemon_factory: Any) -> None:
    """`systemd-socket-activate -l PATH captured serve ...` owns the socket and passes it on the
    first connection; the daemon adopts it, captures arrive, and after the daemon stops the
    socket file is still there (systemd's, not ours)."""
    d: DaemonProcess = daemon_factory()
    set_sampling(d, 100)
    cmd = [
        "systemd-socket-activate",
        "-l",
        d.socket_path,
        sys.executable,
        "-m",
        "captured",
        "serve",
        "--config",
        str(d.config_path),
    ]
    with open(d.stderr_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_for(lambda: os.path.exists(d.socket_path))
        with CaptureClient(d.socket_path) as client:  # the first connection starts the daemon
            for i in range(50):
                client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
            assert client.flush(timeout=30)
        assert query_status(d.socket_path)["counters"]["written"] == 50
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert os.path.exists(d.socket_path)  # the socket is systemd's: it outlives the daemon
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = d.log()
    assert "listening on the socket systemd passed" in log_text
    ids = [
        json.loads(line)["eventMetadata"]["inferenceId"]
        for p in d.delivered_files()
        for line in p.read_text().splitlines()
    ]
    assert sorted(ids, key=int) == [str(i) for i in range(50)]


def test_status_over_frames_reports_the_reload(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a reload to 25 %, status says so; the STATUS reply is the same document."""
    cfg = sampling_config(short_tmp, 100)

    def status_frame(path: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(frames.encode_frame(frames.Kind.STATUS, ()))
            reader = frames.FrameReader()
            doc = None
            while doc is None:
                for kind, payload in reader.feed(s.recv(65536)):
                    if kind == frames.Kind.STATUS_REPLY:
                        doc = frames.any_decoder.decode(payload)
        return doc

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock(), reload=serve_reload(cfg)) as daemon:
            sampling_config(short_tmp, 25)
            reload_and_check(daemon, caplog, "reload: applied")
            # Over the socket, in threads: the daemon answers on this loop.
            assert (await asyncio.to_thread(query_status, cfg.socket_path))["CurrentSamplingPercentage"] == 25
            doc = await asyncio.to_thread(status_frame, cfg.socket_path)
            assert doc["CurrentSamplingPercentage"] == 25

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
