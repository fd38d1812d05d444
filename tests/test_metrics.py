"""Prometheus metrics from a live daemon, over TCP and over a Unix socket, against its status."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from pathlib import Path

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from captured.client.aio import AsyncCaptureClient
from captured.daemon.pipeline import DROP_REASONS
from captured.testing.inprocess import FakeClock, run_daemon, status_doc, write_config
from captured.wire import frames


def scrape_tcp(address: str, path: str = "/metrics") -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def scrape_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "endpoint"))
            out[(s.name, labels)] = s.value
    return out


async def send(socket_path: str, n: int) -> None:
    async with AsyncCaptureClient(socket_path) as client:
        for i in range(n):
            client.capture(f"{i},1\n", "0", request_content_type="text/csv")
        assert await client.flush(timeout=10)


def send_raw_bad_variant(socket_path: str, n: int) -> None:
    """Records a client library would refuse: the daemon refuses them one by one. Blocking
    socket code: run it in a thread while the loop runs the daemon."""
    rec = frames.Record(b"1,2\n", b"0", "text/csv", "text/csv", time.time(), variant_name="../../etc")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(socket_path)
        s.sendall(frames.frame(frames.Kind.BATCH, msgspec.msgpack.encode([rec] * n)))
        s.sendall(frames.encode_frame(frames.Kind.FLUSH, (1,)))
        reader = frames.FrameReader()
        while not any(kind == frames.Kind.ACK for kind, _ in reader.feed(s.recv(65536))):
            pass


def test_metrics_over_tcp_match_status_and_add_up(short_tmp: Path) -> None:
    cfg = write_config(
        short_tmp,
        extra_toml='[metrics]\naddress = "127.0.0.1:0"\n',
        data_capture=(
            "[DataCaptureConfig]\nInitialSamplingPercentage = 50\n"
            f'DestinationS3Uri = "file://{short_tmp / "out"}"\n'
            'CaptureOptions = [{ CaptureMode = "Input" }]\n'
            '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
        ),
    )

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await send(cfg.socket_path, 1000)
            # refused (invalid_record) unless sampled out first
            await asyncio.to_thread(send_raw_bad_variant, cfg.socket_path, 10)
            address = status_doc(daemon)["metrics"]
            status, content_type, text = await asyncio.to_thread(scrape_tcp, address)
            assert status == 200 and content_type.startswith("text/plain; version=")
            m = samples(text)
            st = status_doc(daemon)
            c = st["counters"]
            assert m[("captured_records_received_total", ())] == c["received"] == 1010
            assert m[("captured_records_written_total", ())] == c["written"]
            dropped = {
                labels[0][1]: v for (name, labels), v in m.items() if name == "captured_records_dropped_total"
            }
            assert set(dropped) == set(DROP_REASONS)  # every reason has a series, at 0 until it happens
            assert {k: v for k, v in dropped.items() if v} == c["dropped"]
            assert dropped["invalid_record"] >= 1 and dropped["sampled_out"] > 0
            assert (
                m[("captured_records_written_total", ())] + sum(dropped.values())
                == m[("captured_records_received_total", ())]
            )
            assert m[("captured_sampling_percentage", ())] == 50
            assert m[("captured_capture_started", ())] == 1
            assert m[("captured_clients_connected", ())] >= 0
            assert ("captured_build_info", (("version", st["version"]),)) in m
            assert (await asyncio.to_thread(scrape_tcp, address, "/other"))[0] == 404

    asyncio.run(main())  # run_daemon checks that the daemon exited 0


def test_metrics_on_a_unix_socket(short_tmp: Path) -> None:
    path = str(short_tmp / "m.sock")
    cfg = write_config(short_tmp, extra_toml=f'[metrics]\naddress = "{path}"\n')

    async def main() -> None:
        async with run_daemon(cfg, clock=FakeClock()):
            await send(cfg.socket_path, 20)
            m = samples(await asyncio.to_thread(scrape_unix, path))
            assert m[("captured_records_written_total", ())] == 20
            assert m[("captured_delivery_files_waiting", ())] >= 0

    asyncio.run(main())  # run_daemon checks that the daemon exited 0
