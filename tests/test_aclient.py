"""`AsyncCaptureClient` against a real daemon (no mocked socket, no mocked daemon): in the test's
own event loop (`captured.testing.inprocess`), or a subprocess where the test stops, freezes,
kills or restarts it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from captured.client import aio
from captured.client.aio import AsyncCaptureClient
from captured.testing.daemon import DaemonProcess
from captured.testing.inprocess import (
    FakeClock,
    delivered_files,
    delivered_lines,
    run_daemon,
    status_doc,
    write_config,
)

T = TypeVar("T")

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
HOUR = 1714564800.0  # 2024-05-01T12:00:00Z


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main)


def in_thread(fn: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
    """Start/stop daemons without blocking the loop the client runs on."""
    return asyncio.to_thread(fn, *args)


def csv_line(i: int) -> bytes:
    return (
        b'{"captureData":{'
        b'"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"1,2,%d","encoding":"CSV"},'
        b'"endpointOutput":{"observedContentType":"text/csv","mode":"OUTPUT","data":"0.%d","encoding":"CSV"}},'
        b'"eventMetadata":{"eventId":"ev-%d","inferenceId":"inf-%d","inferenceTime":"2024-05-01T12:00:%02dZ"},'
        b'"eventVersion":"0"}\n' % (i, i, i, i, i)
    )


def capture_csv(client: AsyncCaptureClient, i: int) -> bool:
    return client.capture(
        b"1,2,%d" % i,
        b"0.%d" % i,
        request_content_type="text/csv",
        response_content_type="text/csv",
        event_id=f"ev-{i}",
        inference_id=f"inf-{i}",
        inference_time=HOUR + i,
    )


def event_ids(d: DaemonProcess) -> list[str]:
    return [line["eventMetadata"]["eventId"] for line in d.delivered_lines()]


def delivered_event_ids(root: Path) -> list[str]:
    """`event_ids` of what an in-process daemon on `write_config(root)` delivered."""
    return [line["eventMetadata"]["eventId"] for line in delivered_lines(root)]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_records_arrive_byte_exact(short_tmp: Path, loop: str) -> None:
    """Created and used outside a loop, then inside one: every record arrives exactly as given.

    One record is captured before any loop runs (it waits in the buffer), the rest inside the
    loop; a CSV pair, a JSON body with custom attributes and a binary (BASE64) request. After
    `flush()` the counters add up; stopping the daemon seals and delivers the hour's file. The
    daemon runs in the same loop as the client (asyncio or uvloop).
    """
    cfg = write_config(short_tmp)
    client = AsyncCaptureClient(cfg.socket_path)
    assert capture_csv(client, 0)

    async def main() -> dict[str, Any]:
        async with run_daemon(cfg, clock=FakeClock()), client:
            for i in range(1, 20):
                assert capture_csv(client, i)
            assert client.capture(
                '{"q":"é"}',
                None,
                request_content_type="application/json",
                event_id="ev-json",
                custom_attributes="c=1",
                inference_time=HOUR + 30.9,
            )
            assert client.capture(
                b"\x00\xff",
                b"",
                request_content_type="application/octet-stream",
                event_id="ev-bin",
                inference_time=HOUR + 31,
            )
            assert await client.flush()
            return client.stats()

    stats = run(main(), loop)  # run_daemon stopped the daemon and checked that it exited 0
    assert stats == {
        "captured": 22,
        "sent": 22,
        "acknowledged": 22,
        "buffered": 0,
        "dropped": {},
        "resent": 0,
        "protocol": 2,
    }
    expected = b"".join(csv_line(i) for i in range(20))
    expected += (
        b'{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT",'
        b'"data":"{\\"q\\":\\"\xc3\xa9\\"}","encoding":"JSON"}},'
        b'"eventMetadata":{"eventId":"ev-json","customAttributes":"c=1","inferenceTime":"2024-05-01T12:00:30Z"},'
        b'"eventVersion":"0"}\n'
        b'{"captureData":{"endpointInput":{"observedContentType":"application/octet-stream","mode":"INPUT",'
        b'"data":"AP8=","encoding":"BASE64"},'
        b'"endpointOutput":{"observedContentType":null,"mode":"OUTPUT","data":"","encoding":"BASE64"}},'
        b'"eventMetadata":{"eventId":"ev-bin","inferenceTime":"2024-05-01T12:00:31Z"},"eventVersion":"0"}\n'
    )
    assert b"".join(p.read_bytes() for p in delivered_files(short_tmp)) == expected


def test_no_daemon_drops_and_never_blocks(short_tmp: Path) -> None:
    """No daemon at all: capture() stays fast, the full buffer drops `buffer_full`, flush() times
    out with False, close() is prompt and counts what it held as `closed`; nothing raises."""
    client = AsyncCaptureClient(str(short_tmp / "missing.sock"), buffer_bytes=4096, reconnect_max_s=0.2)

    async def main() -> tuple[list[bool], float, bool, float, float]:
        t0 = time.monotonic()
        accepted = []
        for i in range(2000):
            accepted.append(client.capture(b"x" * 100, b"y" * 100, event_id=f"e{i}"))
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the task try (and fail) to connect
        capture_s = time.monotonic() - t0
        t0 = time.monotonic()
        ok = await client.flush(timeout=0.3)
        flush_s = time.monotonic() - t0
        t0 = time.monotonic()
        await client.close(timeout=0.2)
        return accepted, capture_s, ok, flush_s, time.monotonic() - t0

    accepted, capture_s, ok, flush_s, close_s = run(main())
    assert capture_s < 1.0
    assert ok is False and 0.25 < flush_s < 1.0
    assert close_s < 1.5
    stats = client.stats()
    dropped = stats["dropped"]
    assert accepted.count(False) == dropped["buffer_full"] > 1000
    assert stats["sent"] == stats["acknowledged"] == stats["buffered"] == 0
    assert stats["captured"] == 2000 == dropped["buffer_full"] + dropped["closed"]
    assert client.capture(b"late", None) is False
    assert client.stats()["dropped"]["closed"] == dropped["closed"] + 1


def test_reconnects_after_daemon_restart(daemon: DaemonProcess) -> None:
    """Daemon stopped mid-stream, records captured while it is down, daemon started again on the
    same socket: the client reconnects by itself and every record arrives once."""
    client = AsyncCaptureClient(daemon.socket_path, reconnect_max_s=0.2)

    async def main() -> dict[str, Any]:
        async with client:
            for i in range(10):
                assert capture_csv(client, i)
            assert await client.flush()
            assert await in_thread(daemon.stop) == 0
            for i in range(10, 20):  # the daemon is down: these wait in the buffer
                assert capture_csv(client, i)
            await asyncio.sleep(0.3)  # a few failed connection attempts
            assert client.stats()["acknowledged"] == 10
            await in_thread(daemon.start)
            assert await client.flush(timeout=10)
            for i in range(20, 30):
                assert capture_csv(client, i)
            assert await client.flush()
            return client.stats()

    stats = run(main())
    assert stats == {
        "captured": 30,
        "sent": 30,
        "acknowledged": 30,
        "buffered": 0,
        "dropped": {},
        "resent": 0,
        "protocol": 2,
    }
    assert daemon.stop() == 0
    assert sorted(event_ids(daemon)) == sorted(f"ev-{i}" for i in range(30))


def test_records_written_to_a_daemon_killed_unread_are_sent_again(daemon: DaemonProcess) -> None:
    """Daemon frozen (SIGSTOP) so it reads nothing, records and a FLUSH written into the socket,
    then the daemon killed (SIGKILL) and started again: the waiting flush is not answered on the
    broken connection; the client reconnects, sends the unacknowledged records again, and the
    same flush answers True. Every record arrives exactly once and the counters add up."""
    client = AsyncCaptureClient(daemon.socket_path, reconnect_max_s=0.2)
    assert daemon.proc is not None
    pid = daemon.proc.pid

    async def main() -> tuple[bool, bool, dict[str, Any]]:
        async with client:
            assert capture_csv(client, 0)
            assert await client.flush()
            os.kill(pid, signal.SIGSTOP)
            for i in range(1, 6):
                assert capture_csv(client, i)
            pending = asyncio.ensure_future(client.flush(timeout=20))
            await asyncio.sleep(0.2)
            assert client.stats()["sent"] == 6 and client.stats()["buffered"] == 5
            await in_thread(daemon.stop, signal.SIGKILL)
            await asyncio.sleep(0.3)  # reconnects fail meanwhile: the flush keeps waiting
            assert not pending.done()
            await in_thread(daemon.start)
            held_ok = await pending
            assert capture_csv(client, 6)
            ok = await client.flush(timeout=10)
            return held_ok, ok, client.stats()

    held_ok, ok, stats = run(main())
    assert held_ok is True and ok is True
    assert stats["captured"] == stats["acknowledged"] == 7 and stats["buffered"] == 0
    assert stats["sent"] == 7 and stats["resent"] == 5 and stats["dropped"] == {}
    assert daemon.stop() == 0
    # ev-0 was spooled before the kill (the restart recovers it); ev-1..5 were sent again.
    assert sorted(event_ids(daemon)) == [f"ev-{i}" for i in range(7)]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_stalled_daemon_bounds_memory_then_recovers(daemon: DaemonProcess, loop: str) -> None:
    """A daemon that stops reading (SIGSTOP): the transport pauses, records wait in the bounded
    buffer and the overflow is dropped as `buffer_full`; once it reads again everything accepted
    arrives and the counters add up."""
    client = AsyncCaptureClient(daemon.socket_path, buffer_bytes=256 * 1024, batch_bytes=32 * 1024)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    body = b"z" * 4000

    async def main() -> dict[str, Any]:
        async with client:
            assert client.capture(body, None, event_id="first")
            assert await client.flush()
            os.kill(pid, signal.SIGSTOP)
            try:
                for i in range(1000):  # ~4 MB: far more than the socket and the buffer hold
                    client.capture(body, None, event_id=f"e{i}")
                    if i % 10 == 0:
                        await asyncio.sleep(0)
                stalled = client.stats()
                assert stalled["dropped"]["buffer_full"] > 500
                assert stalled["buffered"] > 0
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await client.flush(timeout=20)
            return client.stats()

    stats = run(main(), loop)
    dropped = stats["dropped"]["buffer_full"]
    assert stats["captured"] == 1001 == stats["acknowledged"] + dropped
    assert stats["sent"] == stats["acknowledged"]
    assert daemon.stop() == 0
    assert len(daemon.delivered_lines()) == stats["acknowledged"]


def test_refused_frame_is_dropped_and_logged_once(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon whose frame limit is below the client's: it answers the oversized frame's header
    with ERROR and closes. The frame is dropped as `rejected_by_daemon` (resending it would be
    refused forever), the refusal is logged once by the client (the daemon, in this process too,
    logs to its own loggers), and the client reconnects for what follows."""
    limit = 12 * 1024 * 1024 + 64 * 1024  # the smallest limit the daemon accepts
    cfg = write_config(short_tmp, extra_toml=f"[ingest]\nmax_frame_bytes = {limit}\n")
    client = AsyncCaptureClient(
        cfg.socket_path, max_body_bytes=7 * 1024 * 1024, buffer_bytes=32 << 20, reconnect_max_s=0.2
    )
    big = b"b" * 6_600_000

    async def main() -> dict[str, Any]:
        async with run_daemon(cfg, clock=FakeClock()), client:
            for n in (1, 2):
                assert client.capture(big, big)
                while client.stats()["dropped"].get("rejected_by_daemon", 0) < n:
                    await asyncio.sleep(0.01)
            assert client.capture(b"small", None, event_id="small")
            assert await client.flush()
            return client.stats()

    with caplog.at_level(logging.WARNING, logger="captured.client.aio"):
        stats = run(main())  # run_daemon stopped the daemon and checked that it exited 0
    assert stats["dropped"] == {"rejected_by_daemon": 2}
    assert stats["sent"] == stats["acknowledged"] == 1
    client_records = [r for r in caplog.records if r.name == aio.log.name]
    assert len([r for r in client_records if "refused" in r.getMessage()]) == 1
    assert delivered_event_ids(short_tmp) == ["small"]


def test_validation_errors_raise() -> None:
    """Programming errors raise at once, in or out of a loop, and count nothing."""
    client = AsyncCaptureClient("/nonexistent/c.sock")
    with pytest.raises(ValueError):
        client.capture(b"a", b"b", inference_id="x" * 65)
    with pytest.raises(TypeError):
        client.capture(123, b"b")  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ValueError):
            client.capture(b"a", b"b", inference_time=-1.0)
        with pytest.raises(TypeError):
            client.capture(b"a", b"b", event_id=5)  # type: ignore[arg-type]
        await client.close(timeout=0.1)

    run(main())
    assert client.stats()["captured"] == 0
    with pytest.raises(ValueError):
        AsyncCaptureClient(max_body_bytes=8 * 1024 * 1024)


def test_a_maximum_size_record_fits_the_default_buffer(short_tmp: Path) -> None:
    """Two 6 MiB bodies exceed the default 8 MiB buffer; an empty buffer takes them (the same
    rule as CaptureClient's)."""
    big = b"7" * (6 * 1024 * 1024)
    cfg = write_config(short_tmp)

    async def main() -> tuple[bool, dict[str, Any]]:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            async with AsyncCaptureClient(cfg.socket_path) as client:
                ok = client.capture(
                    big, big, request_content_type="text/csv", response_content_type="text/csv"
                )
                ok = ok and await client.flush(timeout=30)
            return ok, status_doc(daemon)

    ok, status = run(main())
    assert ok
    assert status["counters"] == {"received": 1, "written": 1, "dropped": {}, "resent": 0}
