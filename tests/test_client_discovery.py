"""A client given no path finds the daemon the README starts, and importing it stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
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
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Quick start: `captured serve` in a directory, with its embedded default
    socket (./captured-data/capture.sock), and `CaptureClient()` in the same directory. The
    client is made first, before the daemon listens: it looks for the socket again on every
    connection attempt, so its records arrive once the daemon is up."""
    d = daemon_factory()
    monkeypatch.chdir(d.root)
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    if os.path.exists(SOCKET_CANDIDATES[0]):
        pytest.skip(f"{SOCKET_CANDIDATES[0]} exists on this machine")
    d.socket_path = str(d.root / "captured-data" / "capture.sock")
    d.config_path.write_text(
        'endpoint_name = "test-endpoint"\n'
        f'socket_path = "{d.socket_path}"\n'
        f'spool_dir = "{d.spool_dir}"\n'
        "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{d.out_dir}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    with CaptureClient(reconnect_max_s=0.1) as client:
        assert client.capture(b"1,2", None, request_content_type="text/csv", inference_id="early")
        time.sleep(0.3)  # it tried, found nothing, and holds the record
        d.start()
        assert client.flush(timeout=20)
        assert client.socket_path == d.socket_path
    assert "CAPTURED_SOCKET=" in d.log()  # the daemon says how clients find it
    d.stop()
    assert [r["eventMetadata"]["inferenceId"] for r in d.delivered_lines()] == ["early"]


def test_a_client_finds_the_socket_named_by_captured_socket(
    daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SOCKET_ENV, daemon.socket_path)
    with CaptureClient() as client:
        assert client.capture(b"1,2", b"3", request_content_type="text/csv", response_content_type="text/csv")
        assert client.flush(timeout=10)
    assert daemon.status()["counters"]["written"] == 1


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
