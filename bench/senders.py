"""Sender processes: each pushes its share of records into one server, then reports.

Run through `multiprocessing` (spawn). A sender prepares its payloads and its connection, puts
"ready" on the result queue, waits for the common start event, sends, and puts a `SenderResult`
(as a dict) on the queue. Its CPU time covers sending only (from the start event to the end).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from captured.testing.data import DISTINCT, payloads

#: Records per `sendall` for the naive sender.
NAIVE_CHUNK = 256
#: Client buffer: large enough that a fast sender rarely finds it full.
CAPTURED_BUFFER_BYTES = 64 * 1024 * 1024
#: Pause before offering a refused record again.
RETRY_SLEEP_S = 0.0005


@dataclass
class SenderResult:
    sender: int
    records: int
    send_s: float
    cpu_s: float
    retries: int = 0
    flushed: bool = True
    client_stats: dict[str, Any] | None = None
    error: str | None = None


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def captured_sender(
    index: int,
    socket_path: str,
    n: int,
    size: int,
    ready: Queue[Any],
    go: Event,
    flush_timeout_s: float,
    endpoint_name: str | None = None,
) -> None:
    """Offer every record exactly once through `CaptureClient`, retrying while the buffer is full."""
    from captured import CaptureClient

    pairs = payloads(n, seed=index, size=size)
    client = CaptureClient(socket_path, buffer_bytes=CAPTURED_BUFFER_BYTES, endpoint_name=endpoint_name)
    capture = client.capture
    ready.put("ready")
    go.wait()
    t0, c0 = time.perf_counter(), _cpu()
    retries = 0
    for req, resp in pairs:
        while not capture(req, resp, request_content_type="text/csv", response_content_type="text/csv"):
            retries += 1
            time.sleep(RETRY_SLEEP_S)
    flushed = client.flush(timeout=flush_timeout_s)
    result = SenderResult(
        index, n, time.perf_counter() - t0, _cpu() - c0, retries, flushed, client_stats=client.stats()
    )
    client.close(timeout=1.0)
    ready.put(asdict(result))


def frames_sender(
    index: int, socket_path: str, n: int, size: int, ready: Queue[Any], go: Event, flush_timeout_s: float
) -> None:
    """The daemon's intake without the client library's cost: the BATCH frames `CaptureClient`
    would send (same encoding, same ~512 KiB batches) are built before the clock, then written
    to one socket as fast as it takes them; a FLUSH/ACK at the end confirms processing."""
    from captured.client.record import batch_frames, prepare_record
    from captured.client.sync import TAKE_BYTES
    from captured.wire import frames

    now = time.time()
    prepared = [
        prepare_record(req, resp, "text/csv", "text/csv", None, None, None, None, now, 6 * 1024 * 1024)
        for req, resp in payloads(n, seed=index, size=size)
    ]
    built = batch_frames([r for r, _ in prepared], [sz for _, sz in prepared], TAKE_BYTES)
    del prepared
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    ready.put("ready")
    go.wait()
    t0, c0 = time.perf_counter(), _cpu()
    for frame, _ in built:
        sock.sendall(frame)
    sock.sendall(frames.encode_frame(frames.Kind.FLUSH, (1,)))
    sock.settimeout(flush_timeout_s)
    reader = frames.FrameReader()
    acked = False
    while not acked:
        data = sock.recv(65536)
        if not data:
            break
        acked = any(kind == frames.Kind.ACK for kind, _ in reader.feed(data))
    sock.close()
    ready.put(asdict(SenderResult(index, n, time.perf_counter() - t0, _cpu() - c0, flushed=acked)))


def naive_lines(n: int, seed: int, size: int) -> list[bytes]:
    """The naive wire lines; only the distinct ones are encoded, so the sender is as fast as can be."""
    distinct = [
        (
            json.dumps(
                {
                    "request": req.decode(),
                    "response": resp.decode(),
                    "request_content_type": "text/csv",
                    "response_content_type": "text/csv",
                }
            )
            + "\n"
        ).encode()
        for req, resp in payloads(min(n, DISTINCT), seed=seed, size=size)
    ]
    return [distinct[i % len(distinct)] for i in range(n)] if distinct else []


def naive_sender(
    index: int, socket_path: str, n: int, size: int, ready: Queue[Any], go: Event, flush_timeout_s: float
) -> None:
    """Newline-delimited JSON over one plain socket, `NAIVE_CHUNK` lines per `sendall`."""
    lines = naive_lines(n, index, size)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    ready.put("ready")
    go.wait()
    t0, c0 = time.perf_counter(), _cpu()
    for start in range(0, n, NAIVE_CHUNK):
        sock.sendall(b"".join(lines[start : start + NAIVE_CHUNK]))
    sock.close()
    ready.put(asdict(SenderResult(index, n, time.perf_counter() - t0, _cpu() - c0)))


#: `--sender` choices for the captured systems.
CAPTURED_SENDERS = {"client": captured_sender, "frames": frames_sender}


def run_sender(system: str, *args: Any, sender: str = "client", endpoint_name: str | None = None) -> None:
    """Process target: run one sender; any failure is reported instead of a result.
    `endpoint_name`: what a `CaptureClient` sender names (None: the daemon's default endpoint)."""
    target = naive_sender if system == "naive" else CAPTURED_SENDERS[sender]
    if endpoint_name is not None and target is not captured_sender:
        raise ValueError("only the client sender names an endpoint")
    try:
        if endpoint_name is not None:
            target(*args, endpoint_name)
        else:
            target(*args)
    except BaseException as exc:
        index, ready = args[0], args[4]
        ready.put(asdict(SenderResult(index, 0, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}")))
        raise
