"""CaptureClient: argument validation, fork safety, flush after close."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from captured import CaptureClient
from captured.client.record import prepare_record
from captured.service.config import Config
from captured.service.daemon import Daemon
from captured.testing.inprocess import (
    FakeClock,
    delivered_lines,
    eventually,
    run_daemon,
    status_doc,
    write_config,
)


def prep(**kw: Any) -> tuple[Any, ...]:
    args: dict[str, Any] = dict(
        request_body=b"1",
        response_body=b"2",
        request_content_type="text/csv",
        response_content_type="text/csv",
        inference_id=None,
        custom_attributes=None,
        variant_name=None,
        event_id=None,
        inference_time=1.0,
        max_body_bytes=100,
    )
    args.update(kw)
    return prepare_record(**args)[0]


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(request_body=123), TypeError, "request_body must be bytes, str or None"),
        (dict(response_body=b"x" * 101), ValueError, "101 bytes; the maximum is 100"),
        (dict(inference_id="x" * 65), ValueError, "inference_id is 65 characters"),
        (dict(inference_id=" x"), ValueError, "first not a space"),
        (dict(inference_id=""), ValueError, "1..64 printable"),
        (dict(custom_attributes="é"), ValueError, "ASCII"),
        (dict(custom_attributes="a" * 1025), ValueError, "maximum is 1024"),
        (dict(variant_name="../../etc"), ValueError, "does not match"),
        (dict(request_content_type=b"text/csv"), TypeError, "must be str or None"),
        (dict(inference_time="now"), TypeError, "inference_time must be"),
        (dict(inference_time=True), TypeError, "inference_time must be"),
        (dict(inference_time=-1), ValueError, "outside years 1970..9999"),
        (dict(inference_time=dt.datetime(1960, 1, 1, tzinfo=dt.UTC)), ValueError, "outside years"),
    ],
)
def test_programming_errors_raise(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        prep(**kw)


def test_the_common_call_takes_a_shorter_path_to_the_same_record() -> None:
    """Two bytes bodies and two content types, nothing else: checked in one place, encoded as a
    5-field array that the daemon decodes to the same record as the full form, same size; its
    limits still raise."""
    import msgspec

    from captured.wire import frames

    common = (b"1,2", b"3", "text/csv", "text/csv", None, None, None, None, None)
    fast, fast_size = prepare_record(*common, 100)
    assert len(fast) == 5
    full, full_size = prepare_record(*common[:8], fast[4], 100)
    decode = frames.record_decoder.decode
    assert decode(msgspec.msgpack.encode(fast)) == decode(msgspec.msgpack.encode(full))
    assert fast_size == full_size
    with pytest.raises(ValueError, match="101 bytes"):
        prepare_record(b"x" * 101, *common[1:], 100)
    with pytest.raises(ValueError, match="maximum is 1024"):
        prepare_record(*common[:2], "t" * 1025, *common[3:], 100)


def test_bodies_are_normalised_to_bytes() -> None:
    rec = prep(request_body="é,\ud800", response_body=bytearray(b"ab"))
    assert rec[0] == "é,\ud800".encode("utf-8", "surrogatepass")  # not UTF-8: the daemon uses BASE64
    assert rec[1] == b"ab" and type(rec[1]) is bytes
    assert prep(request_body=memoryview(b"xy"))[0] == b"xy"


def test_naive_datetimes_are_utc() -> None:
    naive = dt.datetime(2021, 5, 18, 0, 29, 2)
    assert prep(inference_time=naive)[4] == naive.replace(tzinfo=dt.UTC).timestamp()


def in_process(root: Path, test: Callable[[Config, Daemon], Awaitable[None]]) -> None:
    """Run `test(cfg, daemon)` against a daemon in this test's event loop (`run_daemon`, on a
    fake clock), on `write_config(root)`; then stop it (it seals and delivers) and check that it
    exited 0. The client's blocking calls (`flush`, `close`) go through `asyncio.to_thread`: the
    daemon runs on this thread's loop."""

    async def main() -> None:
        cfg = write_config(root)
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            await test(cfg, daemon)

    asyncio.run(main())


def test_a_forked_child_gets_its_own_working_client(short_tmp: Path) -> None:
    """A client made before fork() (a pre-fork model server) works in the child and the parent."""

    async def test(cfg: Config, daemon: Daemon) -> None:
        client = CaptureClient(cfg.socket_path)
        kw: dict[str, Any] = dict(request_content_type="text/csv", response_content_type="text/csv")
        client.capture(b"parent-1", b"0", inference_id="parent-1", **kw)
        assert await asyncio.to_thread(client.flush)
        pid = os.fork()
        if pid == 0:  # child: report through the exit status only (the daemon runs in the parent)
            client.capture(b"child", b"0", inference_id="child", **kw)
            ok = client.flush(timeout=10) and client.stats()["captured"] == 1
            os._exit(0 if ok else 1)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.capture(b"parent-2", b"0", inference_id="parent-2", **kw)
        assert await asyncio.to_thread(client.flush)
        assert client.stats()["acknowledged"] == 2
        await asyncio.to_thread(client.close)

    in_process(short_tmp, test)  # stopping the daemon delivers
    ids = sorted(r["eventMetadata"]["inferenceId"] for r in delivered_lines(short_tmp))
    assert ids == ["child", "parent-1", "parent-2"]


def test_flush_after_close_is_false(short_tmp: Path) -> None:
    async def test(cfg: Config, daemon: Daemon) -> None:
        client = CaptureClient(cfg.socket_path)
        client.capture(b"1", b"2")
        await asyncio.to_thread(client.close)
        assert client.stats()["acknowledged"] == 1
        assert await asyncio.to_thread(client.flush) is False
        assert client.capture(b"1", b"2") is False

    in_process(short_tmp, test)


def test_a_maximum_size_record_fits_the_default_buffer(short_tmp: Path) -> None:
    """Two 6 MiB bodies are more than the default 8 MiB buffer; an empty buffer takes them."""
    big = b"7" * (6 * 1024 * 1024)

    async def test(cfg: Config, daemon: Daemon) -> None:
        client = CaptureClient(cfg.socket_path)
        try:
            assert client.capture(big, big, request_content_type="text/csv", response_content_type="text/csv")
            assert await asyncio.to_thread(client.flush, 30)
        finally:
            await asyncio.to_thread(client.close)
        assert status_doc(daemon)["counters"] == {"received": 1, "written": 1, "dropped": {}, "resent": 0}

    in_process(short_tmp, test)


def test_the_client_works_in_a_process_with_more_than_1024_open_files(short_tmp: Path) -> None:
    """A model server with many connections open hands the client socket a descriptor past 1023,
    which select(2) cannot watch: the I/O thread polls instead, and capture works."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("needs 1,300 open files")

    async def test(cfg: Config, daemon: Daemon) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            client = CaptureClient(cfg.socket_path)
            try:
                for i in range(100):
                    assert client.capture(f"{i},1\n", "0", request_content_type="text/csv")
                assert await asyncio.to_thread(client.flush, 10)
                assert client.stats()["acknowledged"] == 100
                assert client._wake_r > 1023  # the descriptors past select(2)'s reach were the client's
            finally:
                await asyncio.to_thread(client.close)
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    in_process(short_tmp, test)


def test_the_wake_pipe_outlives_the_io_thread_until_close_has_joined_it(short_tmp: Path) -> None:
    """The I/O thread may finish first: close() marks the client closing, and a poll timeout can
    let the thread see everything acknowledged and end before close() writes its wake-up byte.
    That byte must not go to a closed descriptor (EBADF from close(), seen once in a full run),
    or worse, to a descriptor number the application has reused since. So the pipe is closed
    only by close(), after joining the thread, and exactly once; no descriptor leaks.

    The daemon shares this process: its descriptors for the hour's open file and the journal
    are opened by a first client before counting (all records carry the same hour), and its end
    of each connection is awaited closed before counting (a client that kept its socket open
    would keep that wait from ending)."""
    clock_hour = 1_714_564_800.0  # every record in the same hour: one open spool file throughout
    kw: dict[str, Any] = dict(
        request_content_type="text/csv", response_content_type="text/csv", inference_time=clock_hour
    )

    def daemon_connections(daemon: Daemon) -> int:
        return daemon.status().ingest.connections

    async def test(cfg: Config, daemon: Daemon) -> None:
        first = CaptureClient(cfg.socket_path)
        assert first.capture(b"0", b"0", **kw)
        await asyncio.to_thread(first.close)
        await eventually(lambda: daemon_connections(daemon) == 0)
        fds_before = len(os.listdir("/proc/self/fd"))
        client = CaptureClient(cfg.socket_path)
        assert client.capture(b"1", b"2", **kw)
        assert await asyncio.to_thread(client.flush, 10)
        with client._lock:  # the state close() leaves before its wake-up write
            client._closing = True
            client._core.closed = True
        await asyncio.to_thread(client._thread.join, 5)
        assert not client._thread.is_alive()  # the I/O thread ended first
        client._wake()  # what close() does next: the pipe is still open
        await asyncio.to_thread(client.close)
        await asyncio.to_thread(client.close)  # twice: nothing left to close
        await eventually(lambda: daemon_connections(daemon) == 0)
        assert len(os.listdir("/proc/self/fd")) == fds_before

    in_process(short_tmp, test)
