"""CaptureClient: argument validation, fork safety, flush after close."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest

from captured import CaptureClient
from captured.client.record import prepare_record
from captured.testing.daemon import DaemonProcess


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


def test_a_forked_child_gets_its_own_working_client(daemon: DaemonProcess) -> None:
    """A client made before fork() (a pre-fork model server) works in the child and the parent."""
    client = CaptureClient(daemon.socket_path)
    kw = dict(request_content_type="text/csv", response_content_type="text/csv")
    client.capture(b"parent-1", b"0", inference_id="parent-1", **kw)
    assert client.flush()
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        client.capture(b"child", b"0", inference_id="child", **kw)
        ok = client.flush(timeout=10) and client.stats()["captured"] == 1
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    client.capture(b"parent-2", b"0", inference_id="parent-2", **kw)
    assert client.flush()
    assert client.stats()["acknowledged"] == 2
    client.close()
    daemon.stop()
    ids = sorted(r["eventMetadata"]["inferenceId"] for r in daemon.delivered_lines())
    assert ids == ["child", "parent-1", "parent-2"]


def test_flush_after_close_is_false(daemon: DaemonProcess) -> None:
    client = CaptureClient(daemon.socket_path)
    client.capture(b"1", b"2")
    client.close()
    assert client.stats()["acknowledged"] == 1
    assert client.flush() is False
    assert client.capture(b"1", b"2") is False


def test_a_maximum_size_record_fits_the_default_buffer(daemon: DaemonProcess) -> None:
    """Two 6 MiB bodies are more than the default 8 MiB buffer; an empty buffer takes them."""
    big = b"7" * (6 * 1024 * 1024)
    with CaptureClient(daemon.socket_path) as client:
        assert client.capture(big, big, request_content_type="text/csv", response_content_type="text/csv")
        assert client.flush(timeout=30)
    assert daemon.status()["counters"] == {"received": 1, "written": 1, "dropped": {}, "resent": 0}


def test_the_client_works_in_a_process_with_more_than_1024_open_files(daemon: DaemonProcess) -> None:
    """A model server with many connections open hands the client socket a descriptor past 1023,
    which select(2) cannot watch: the I/O thread polls instead, and capture works."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("needs 1,300 open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with CaptureClient(daemon.socket_path) as client:
            for i in range(100):
                assert client.capture(f"{i},1\n", "0", request_content_type="text/csv")
            assert client.flush(timeout=10)
            assert client.stats()["acknowledged"] == 100
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_wake_pipe_outlives_the_io_thread_until_close_has_joined_it(daemon: DaemonProcess) -> None:
    """The I/O thread may finish first: close() marks the client closing, and a poll timeout can
    let the thread see everything acknowledged and end before close() writes its wake-up byte.
    That byte must not go to a closed descriptor (EBADF from close(), seen once in a full run),
    or worse, to a descriptor number the application has reused since. So the pipe is closed
    only by close(), after joining the thread, and exactly once; no descriptor leaks."""
    fds_before = len(os.listdir("/proc/self/fd"))
    client = CaptureClient(daemon.socket_path)
    assert client.capture(b"1", b"2", request_content_type="text/csv", response_content_type="text/csv")
    assert client.flush(timeout=10)
    with client._lock:  # the state close() leaves before its wake-up write
        client._closing = True
        client._core.closed = True
    client._thread.join(timeout=5)
    assert not client._thread.is_alive()  # the I/O thread ended first
    client._wake()  # what close() does next: the pipe is still open
    client.close()
    client.close()  # twice: nothing left to close
    assert len(os.listdir("/proc/self/fd")) == fds_before
