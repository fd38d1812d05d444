"""A client given no path finds the daemon the README starts, and importing it stays light. The
daemon runs in the test's event loop (`captured.testing.inprocess`); the sync client's blocking
calls go through `asyncio.to_thread`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captured import CaptureClient
from captured.service.config import load_config
from captured.testing.inprocess import FakeClock, delivered_lines, run_daemon, status_doc, write_config
from captured.wire.rules import SOCKET_CANDIDATES, SOCKET_ENV, find_socket


def test_find_socket_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit path wins, then $CAPTURED_SOCKET, then the first candidate that exists (the
    systemd path, then ./captured-data/capture.sock made absolute), else the systemd path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    if os.path.exists(SOCKET_CANDIDATES[0]):
        pytest.skip(f"{SOCKET_CANDIDATES[0]} exists on this machine")
    assert find_socket() == SOCKET_CANDIDATES[0]
    (tmp_path / "captured-data").mkdir()
    (tmp_path / "captured-data" / "capture.sock").touch()
    assert find_socket() == str(tmp_path / "captured-data" / "capture.sock")
    monkeypatch.setenv(SOCKET_ENV, "/somewhere/else.sock")
    assert find_socket() == "/somewhere/else.sock"
    assert find_socket("/given.sock") == "/given.sock"


def test_a_client_with_no_path_finds_the_quick_start_daemon_started_after_it(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's Quick start: `captured serve` in a directory, with its embedded default
    socket (./captured-data/capture.sock), and `CaptureClient()` in the same directory. The
    client is made first, before the daemon listens: it looks for the socket again on every
    connection attempt, so its records arrive once the daemon is up."""
    root = short_tmp / "d"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    if os.path.exists(SOCKET_CANDIDATES[0]):
        pytest.skip(f"{SOCKET_CANDIDATES[0]} exists on this machine")
    socket_path = str(root / "captured-data" / "capture.sock")
    config_path = root / "captured.toml"
    config_path.write_text(
        'endpoint_name = "test-endpoint"\n'
        f'socket_path = "{socket_path}"\n'
        f'spool_dir = "{root / "spool"}"\n'
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{root / "out"}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    cfg = load_config(str(config_path))

    async def main() -> None:
        client = CaptureClient(reconnect_max_s=0.1)
        assert client.capture(b"1,2", None, request_content_type="text/csv", inference_id="early")
        await asyncio.sleep(0.3)  # it tried, found nothing, and holds the record
        async with run_daemon(cfg, clock=FakeClock()):
            try:
                assert await asyncio.to_thread(client.flush, 20)
                assert client.socket_path == socket_path
            finally:
                await asyncio.to_thread(client.close)

    with caplog.at_level(logging.INFO, logger="captured"):
        asyncio.run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert "CAPTURED_SOCKET=" in caplog.text  # the daemon says how clients find it
    assert [r["eventMetadata"]["inferenceId"] for r in delivered_lines(root)] == ["early"]


def test_a_client_finds_the_socket_named_by_captured_socket(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(short_tmp)
    monkeypatch.setenv(SOCKET_ENV, cfg.socket_path)

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            client = CaptureClient()
            try:
                assert client.capture(
                    b"1,2", b"3", request_content_type="text/csv", response_content_type="text/csv"
                )
                assert await asyncio.to_thread(client.flush, 10)
            finally:
                await asyncio.to_thread(client.close)
            assert status_doc(daemon)["counters"]["written"] == 1

    asyncio.run(main())


def test_importing_the_client_loads_neither_the_daemon_nor_its_dependencies() -> None:
    """A model server imports the client: not the config (tomllib and its validation), not the
    daemon's stages, not delivery (aiobotocore), not uvloop."""
    code = (
        "import sys, json\n"
        "from captured import CaptureClient, AsyncCaptureClient\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    heavy = {
        m
        for m in loaded
        if m.startswith(
            ("captured.service", "captured.daemon", "captured.delivery", "aiobotocore", "botocore")
        )
        or m in ("uvloop", "tomllib", "psutil", "prometheus_client", "zstandard")
    }
    assert heavy == set()
    assert {"captured.client.sync", "captured.client.aio", "captured.wire.frames"} <= loaded
