"""Running as a service: live reload on SIGHUP, sd_notify and the watchdog, socket activation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.client.record import DEFAULT_LINGER_S
from captured.service.cli import query_status
from captured.testing.daemon import DaemonProcess, wait_for
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


def sighup_and_wait(d: DaemonProcess, marker: str) -> None:
    seen = d.log().count(marker)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log().count(marker) > seen)


#: A record reaches the daemon within the client's linger (plus scheduling): a record captured
#: before a switch is processed before it if the switch waits this long.
SENT_WITHIN_S = 10 * DEFAULT_LINGER_S


def test_sighup_switches_sampling_mid_stream_without_losing_a_record_or_a_connection(
    daemon_factory: Any,
) -> None:
    """A client streams records while sampling goes 100 -> 0 -> 100 by SIGHUP: every record
    sent is either written or sampled_out, none twice, records sent at 0 % are all dropped, and
    the client's one connection stays open throughout (no status query runs meanwhile)."""
    d: DaemonProcess = daemon_factory()
    set_sampling(d, 100)
    d.start()
    before = d.status()["ingest"]["connections_total"]
    phase = {"pct": 100}
    sent_at: dict[int, int] = {}
    stop = threading.Event()

    def stream() -> None:
        with CaptureClient(d.socket_path) as client:
            i = 0
            while not stop.is_set():
                if client.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i)):
                    sent_at[i] = phase["pct"]
                i += 1
                if i % 100 == 0:
                    time.sleep(0.005)
            assert client.flush(timeout=10)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        time.sleep(0.3)
        set_sampling(d, 0)
        phase["pct"] = -1  # switching: either outcome is right for these
        time.sleep(SENT_WITHIN_S)  # what was captured before is at the daemon now
        sighup_and_wait(d, "reload: applied")
        phase["pct"] = 0
        time.sleep(0.3)
        set_sampling(d, 100)
        phase["pct"] = -1
        time.sleep(SENT_WITHIN_S)
        sighup_and_wait(d, "reload: applied")
        phase["pct"] = 100
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    st = d.status()
    assert st["ingest"]["connections_total"] == before + 2  # the stream's, and this query
    c = st["counters"]
    assert c["received"] == len(sent_at) and c["written"] + c["dropped"]["sampled_out"] == c["received"]
    assert d.stop() == 0
    written = [int(line["eventMetadata"]["inferenceId"]) for line in d.delivered_lines()]
    assert len(written) == len(set(written)) == c["written"]
    assert all(sent_at[i] != 0 for i in written)  # nothing sent at 0 % was written
    assert all(i in set(written) for i, pct in sent_at.items() if pct == 100)
    assert sum(1 for pct in sent_at.values() if pct == 0) > 0


def test_an_invalid_or_restart_only_change_on_sighup_changes_nothing(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    set_sampling(d, 100)
    d.start()
    good = d.config_path.read_text()
    d.config_path.write_text(
        good.replace("InitialSamplingPercentage = 100", "InitialSamplingPercentage = 150")
    )
    sighup_and_wait(d, "reload refused")
    assert "InitialSamplingPercentage = 150" in d.log()
    d.config_path.write_text(
        good.replace("InitialSamplingPercentage = 100", "InitialSamplingPercentage = 10")
    )
    d.config_path.write_text(
        d.config_path.read_text().replace('variant_name = "AllTraffic"', 'variant_name = "Other"')
    )
    sighup_and_wait(d, "reload refused")
    assert "variant_name cannot change without a restart" in d.log()
    st = d.status()
    assert st["CurrentSamplingPercentage"] == 100 and st["VariantName"] == "AllTraffic"
    d.config_path.write_text(good)
    sighup_and_wait(d, "the configuration is unchanged")
    assert d.stop() == 0


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


def test_status_over_frames_reports_the_reload(daemon_factory: Any) -> None:
    """After a reload to 25 %, status says so; the STATUS reply is the same document."""
    d: DaemonProcess = daemon_factory()
    set_sampling(d, 100)
    d.start()
    set_sampling(d, 25)
    sighup_and_wait(d, "reload: applied")
    assert d.status()["CurrentSamplingPercentage"] == 25
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.socket_path)
        s.sendall(frames.encode_frame(frames.Kind.STATUS, ()))
        reader = frames.FrameReader()
        doc = None
        while doc is None:
            for kind, payload in reader.feed(s.recv(65536)):
                if kind == frames.Kind.STATUS_REPLY:
                    doc = frames.any_decoder.decode(payload)
    assert doc["CurrentSamplingPercentage"] == 25
    assert d.stop() == 0
