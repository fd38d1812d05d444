"""End to end: the real client -> a real daemon subprocess -> files in the file:// destination.

What needs the process stays here: signals, exit codes, SIGKILL and restarts, the command line.
Where a test is about a second `captured serve` refusing to start, the first daemon runs in the
test's event loop (`captured.testing.inprocess`); the rest of the daemon's behaviour is tested
in-process in test_daemon_behaviour.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from captured import CaptureClient
from captured.client.aio import AsyncCaptureClient
from captured.service.cli import query_status
from captured.testing.daemon import DaemonProcess, wait_for
from captured.testing.inprocess import (
    FakeClock,
    csv_pair,
    delivered_lines,
    raw_records,
    run_daemon,
    write_config,
)

UTC = dt.UTC


def capture_all(d: DaemonProcess, records: list[dict[str, Any]]) -> CaptureClient:
    client = CaptureClient(d.socket_path)
    for r in records:
        body = {k: v for k, v in r.items() if k not in ("request_body", "response_body")}
        assert client.capture(r["request_body"], r["response_body"], **body)
    assert client.flush(timeout=10)
    return client


async def capture_all_async(socket_path: str, records: list[dict[str, Any]]) -> None:
    """`capture_all` for a daemon in this loop: every record accepted and flushed."""
    async with AsyncCaptureClient(socket_path) as client:
        for r in records:
            body = {k: v for k, v in r.items() if k not in ("request_body", "response_body")}
            assert client.capture(r["request_body"], r["response_body"], **body)
        assert await client.flush(timeout=10)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `captured serve` to its end (blocking: in a thread while a daemon runs in the loop)."""
    return subprocess.run(
        [sys.executable, "-m", "captured", "serve", *args], capture_output=True, text=True, timeout=30
    )


def test_client_without_daemon_never_blocks_or_raises(short_tmp: Path) -> None:
    client = CaptureClient(str(short_tmp / "absent.sock"), buffer_bytes=64 * 1024)
    results = [client.capture(**csv_pair(i)) for i in range(5000)]
    stats = client.stats()
    assert stats["captured"] == 5000
    assert results.count(False) == stats["dropped"]["buffer_full"] > 0
    assert stats["acknowledged"] == 0
    assert client.flush(timeout=0.2) is False
    client.close(timeout=0.2)
    assert client.capture(**csv_pair(0)) is False
    assert client.stats()["dropped"]["closed"] >= 1


def test_client_reconnects_after_a_daemon_restart(daemon: DaemonProcess) -> None:
    client = CaptureClient(daemon.socket_path, reconnect_max_s=0.2)
    capture_all_into = [client.capture(**csv_pair(i)) for i in range(10)]
    assert all(capture_all_into) and client.flush()
    daemon.stop()
    daemon.start()
    client.capture(**csv_pair(10))
    wait_for(lambda: client.flush(timeout=1.0), timeout=15)
    client.close()
    assert daemon.status()["counters"]["written"] >= 1
    daemon.stop()
    ids = sorted(int(r["eventMetadata"]["inferenceId"]) for r in daemon.delivered_lines())
    assert ids[:10] == list(range(10)) and ids[-1] == 10


def test_shutdown_drains_what_clients_sent(daemon: DaemonProcess) -> None:
    """Frames already written to the socket when SIGTERM arrives are read, written, sealed and
    delivered before the daemon exits 0; nothing is left in the spool."""
    n = 20000
    data = raw_records(n)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        s.sendall(data[: len(data) // 2])
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        s.sendall(data[len(data) // 2 :])
        assert daemon.proc.wait(30) == 0  # type: ignore[union-attr]
    assert len(daemon.delivered_lines()) == n
    assert set(os.listdir(daemon.spool_dir)) == {".lock", ".journal"}
    assert "stopped: received 20000, written 20000" in daemon.log()


def test_a_crashed_run_is_recovered_at_start(daemon_factory: Any) -> None:
    """A `.part` file with a torn last line, left by a killed daemon, is cut to whole lines,
    sealed and delivered by the next start."""
    d: DaemonProcess = daemon_factory()
    d.start()
    capture_all(d, [csv_pair(i) for i in range(100)]).close()
    d.stop(signal.SIGKILL)
    (part,) = d.spool_dir.glob("*.jsonl.part")
    with open(part, "ab") as fh:
        fh.write(b'{"captureData":{"endpointIn')
    d.start()
    wait_for(lambda: len(d.delivered_lines()) == 100)
    d.stop()
    assert [int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()] == list(range(100))
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_records_acknowledged_by_flush_survive_sigkill_and_torn_sealed_files_are_cut(
    daemon_factory: Any,
) -> None:
    """Everything flush() confirmed is delivered after a SIGKILL and a restart. A sealed file
    whose end was lost (as a power loss can leave one written since the last flush) is cut back to
    its last complete line at start, never delivered torn."""
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 3600\n")
    d.start()
    capture_all(d, [csv_pair(i) for i in range(300)]).close()  # flush()ed inside
    d.stop(signal.SIGKILL)
    (part,) = d.spool_dir.glob("*.jsonl.part")
    sealed = part.with_name(part.name[: -len(".part")])
    part.rename(sealed)  # as if it had been sealed just before the power went
    with open(sealed, "r+b") as fh:
        fh.truncate(sealed.stat().st_size - 10)
    d.start()
    wait_for(lambda: len(d.delivered_lines()) == 299)
    d.stop()
    assert [int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()] == list(range(299))
    assert "its end was torn" in d.log()


def test_embedded_default_runs_without_any_config(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "captured", "serve"], cwd=short_tmp, env=env, stderr=subprocess.PIPE, text=True
    )
    sock = short_tmp / "captured-data" / "capture.sock"
    try:
        wait_for(lambda: sock.exists() and query_status(str(sock)), timeout=15)
        with CaptureClient(str(sock)) as client:
            client.capture(b"1,2", b"0", request_content_type="text/csv", response_content_type="text/csv")
            assert client.flush()
        status = query_status(str(sock))
        assert status["EndpointName"] == "local-endpoint"
        assert status["CurrentSamplingPercentage"] == 100
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert str(sock) in err and str(short_tmp / "captured-data" / "out") in err
    (f,) = (short_tmp / "captured-data" / "out" / "local-endpoint" / "AllTraffic").rglob("*.jsonl")
    rec = json.loads(f.read_text())
    assert rec["captureData"]["endpointInput"]["encoding"] == "CSV"


def test_serve_refuses_an_invalid_config_before_doing_anything(short_tmp: Path) -> None:
    cfg = short_tmp / "bad.toml"
    cfg.write_text(
        f'endpoint_name = "bad_name"\nsocket_path = "{short_tmp}/s.sock"\n'
        "[DataCaptureConfig]\nInitialSamplingPercentage = 101\n"
        'DestinationS3Uri = "https://bucket.s3.amazonaws.com/x"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "captured", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    problems = out.stderr.strip().splitlines()
    assert len(problems) == 3
    assert any("endpoint_name" in p and "bad_name" in p for p in problems)
    assert any("InitialSamplingPercentage" in p and "101" in p for p in problems)
    assert any("DestinationS3Uri" in p and "s3://" in p for p in problems)
    assert not (short_tmp / "s.sock").exists()


def test_check_prints_the_effective_configuration(short_tmp: Path) -> None:
    dcc = short_tmp / "endpoint-config.json"
    dcc.write_text(
        json.dumps(
            {
                "EndpointConfigName": "churn-config",
                "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m"}],
                "DataCaptureConfig": {
                    "EnableCapture": True,
                    "InitialSamplingPercentage": 20,
                    "DestinationS3Uri": "s3://my-bucket/datacapture/",
                    "CaptureOptions": [{"CaptureMode": "REQUEST"}, {"CaptureMode": "RESPONSE"}],
                    "CaptureContentTypeHeader": {"CsvContentTypes": ["text/csv"]},
                },
            }
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "captured",
            "check",
            "--data-capture-config",
            str(dcc),
            "--socket",
            str(short_tmp / "x.sock"),
            "--spool-dir",
            str(short_tmp / "spool"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=short_tmp,
    )
    assert out.returncode == 0, out.stderr
    assert "InitialSamplingPercentage = 20" in out.stdout
    assert "s3://my-bucket/datacapture/" in out.stdout
    assert 'CaptureMode = "Input"' in out.stdout and 'CaptureMode = "Output"' in out.stdout
    assert not (short_tmp / "spool").exists()  # check changes nothing


def test_a_stalled_daemon_never_blocks_the_caller(daemon: DaemonProcess) -> None:
    """SIGSTOP the daemon: capture() keeps returning, the bounded buffer drops and counts; after
    SIGCONT everything that was buffered is delivered and flush() confirms it."""
    client = CaptureClient(daemon.socket_path, buffer_bytes=256 * 1024)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        results = [client.capture(**csv_pair(i)) for i in range(30000)]
        assert client.flush(timeout=0.2) is False
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    stats = client.stats()
    dropped = stats["dropped"].get("buffer_full", 0)
    assert dropped == results.count(False) > 0
    assert wait_for(lambda: client.flush(timeout=2.0), timeout=30)
    stats = client.stats()
    assert stats["acknowledged"] == stats["captured"] - dropped == results.count(True)
    assert daemon.status()["counters"]["written"] == results.count(True)
    client.close()


def test_the_sample_service_config_is_valid(short_tmp: Path) -> None:
    """Every value of the shipped file is valid. `check` also looks at this host, where the
    service's paths (/run/captured, /var/lib/captured) need not be creatable by whoever runs the
    tests: those three are pointed at a scratch directory, and the file says the rest."""
    sample = Path(__file__).resolve().parent.parent / "systemd" / "captured.toml"
    host = ["--socket", str(short_tmp / "c.sock"), "--spool-dir", str(short_tmp / "spool")]
    host += ["--destination", f"file://{short_tmp / 'out'}"]
    out = subprocess.run(
        [sys.executable, "-m", "captured", "check", "--config", str(sample), *host],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_a_second_daemon_on_the_same_socket_refuses_to_start(short_tmp: Path) -> None:
    """The first daemon runs in this loop; the second is a `captured serve` process on the same
    config: it exits 1 and says why, and the first still answers on its socket."""
    cfg = write_config(short_tmp)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            out = await asyncio.to_thread(serve, "--config", str(short_tmp / "captured.toml"))
            assert out.returncode == 1
            assert "another daemon is using the spool" in out.stderr
            status = await asyncio.to_thread(query_status, cfg.socket_path)
            assert status["CaptureStatus"] == "Started"  # the first one is untouched

    asyncio.run(main())


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    cfg = write_config(short_tmp)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(cfg.socket_path)
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            # Asked over the socket, as `DaemonProcess.status()` does: the new daemon answers there.
            status = await asyncio.to_thread(query_status, cfg.socket_path)
            assert status["CaptureStatus"] == "Started"

    asyncio.run(main())


def test_second_sigint_exits_at_once(daemon: DaemonProcess) -> None:
    """First SIGINT starts a graceful shutdown, which keeps draining while a client keeps
    sending; a second SIGINT ends the process at once with status 130."""
    import threading

    frame = raw_records(200)
    stop = threading.Event()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket_path)

    def keep_sending() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                s.sendall(frame)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        assert daemon.proc is not None
        wait_for(lambda: daemon.status()["counters"]["received"] > 0)
        daemon.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "shutting down" in daemon.log())
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 130
    finally:
        stop.set()
        s.close()
        sender.join(5)


def test_data_sent_just_after_sigterm_on_an_idle_connection_is_kept(daemon: DaemonProcess) -> None:
    """A connection idle for a while before SIGTERM still gets its drain window."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket_path)
        wait_for(lambda: daemon.status()["ingest"]["connections"] == 2)  # ours + the status query
        import time

        time.sleep(0.3)  # idle longer than the drain's quiet period
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        s.sendall(raw_records(50))
        assert daemon.proc.wait(30) == 0
    assert len(daemon.delivered_lines()) == 50


def test_two_daemons_never_share_a_spool(short_tmp: Path) -> None:
    """A second daemon on the same spool (another socket) refuses to start and leaves the first
    daemon's open file alone. The first runs in this loop, the second is a `captured serve`
    process."""
    root = short_tmp / "d"
    root.mkdir()
    cfg = write_config(root)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            await capture_all_async(cfg.socket_path, [csv_pair(i) for i in range(5)])
            out = await asyncio.to_thread(
                serve, "--config", str(root / "captured.toml"), "--socket", str(short_tmp / "other.sock")
            )
            assert out.returncode == 1 and "another daemon is using the spool" in out.stderr
            assert len(list(Path(cfg.spool_dir).glob("*.jsonl.part"))) == 1

    asyncio.run(main())  # run_daemon stopped the first daemon and checked that it exited 0
    assert len(delivered_lines(root)) == 5


def test_kill_9_at_random_moments_loses_no_acknowledged_record_and_tears_no_line(
    daemon_factory: Any,
) -> None:
    """Five times: a client captures in a loop (flushing every 200 records), the daemon is killed
    with SIGKILL at a random moment and started again. In the end every line delivered parses,
    no record is delivered twice, every record a flush() confirmed is there, and so is every
    record capture() accepted (the client sent again what was not acknowledged); the client
    resumed on its own after each restart."""
    import random
    import threading

    rng = random.Random(7)
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 0.3\n")
    d.start()
    confirmed: set[int] = set()
    accepted: list[int] = []
    stop = threading.Event()

    def capture_loop() -> None:
        client = CaptureClient(d.socket_path, reconnect_max_s=0.1)
        i = 0
        pending: list[int] = []
        while not stop.is_set():
            if client.capture(**csv_pair(i)):
                pending.append(i)
                accepted.append(i)
            i += 1
            if len(pending) >= 200:
                if client.flush(timeout=2):
                    confirmed.update(pending)
                pending = []
        if client.flush(timeout=5):
            confirmed.update(pending)
        client.close()

    thread = threading.Thread(target=capture_loop)
    thread.start()
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.2, 0.8))
            d.stop(signal.SIGKILL)
            d.start()
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    assert d.stop() == 0
    ids = []
    for path in d.delivered_files():
        for raw in path.read_bytes().splitlines(keepends=True):
            assert raw.endswith(b"\n")
            ids.append(int(json.loads(raw)["eventMetadata"]["inferenceId"]))
    assert len(ids) == len(set(ids)), "a record was delivered twice"
    assert confirmed and confirmed <= set(ids)
    assert sorted(ids) == accepted
    assert {p.name for p in d.spool_dir.iterdir()} == {".lock", ".journal"}


def test_a_task_that_fails_of_a_bug_ends_the_daemon_loudly_and_loses_nothing(daemon_factory: Any) -> None:
    """A long-lived task dies of a bug (here the tick's spool rotation raises, injected into a
    real `captured serve` process): the daemon does not go on half-alive, it logs the traceback
    at CRITICAL and exits 70 (systemd's Restart=on-failure restarts it). The records it had
    acknowledged are in the spool, and the next start recovers and delivers every one."""
    d = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 3600\n")
    d.write_config()
    boom = d.root / "boom"
    code = (
        "import os, sys\n"
        "from captured.daemon.spool import Spool\n"
        "tick = Spool.tick\n"
        "def failing_tick(self):\n"
        f"    if os.path.exists({str(boom)!r}):\n"
        "        raise RuntimeError('injected: a bug in a long-lived task')\n"
        "    return tick(self)\n"
        "Spool.tick = failing_tick\n"
        "from captured.service.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(d.config_path)!r}]))\n"
    )
    log = open(d.stderr_path, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
    try:
        wait_for(lambda: os.path.exists(d.socket_path) and d.status(), timeout=15)
        with CaptureClient(d.socket_path) as client:
            for i in range(50):
                assert client.capture(f"{i}\n", None, request_content_type="text/csv", inference_id=str(i))
            assert client.flush(timeout=10)
        boom.touch()
        assert proc.wait(timeout=15) == 70
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = d.log()
    assert "CRITICAL" in text and "the daemon failed and stops" in text
    assert "RuntimeError: injected: a bug in a long-lived task" in text
    d.start()
    d.stop()
    assert sorted(int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines()) == list(range(50))
