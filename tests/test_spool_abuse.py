"""One client cannot take the spool from the others: far-future hours are refused one by one,
open files are capped (see also tests/test_spool.py), and the others' records all arrive. The
daemon runs in the test's event loop (`captured.testing.inprocess`); the clients are the sync
`CaptureClient`, whose blocking calls go through `asyncio.to_thread`."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

from captured import CaptureClient
from captured.daemon.encode import LineEncoder
from captured.testing.data import dcc
from captured.testing.inprocess import (
    FakeClock,
    delivered_lines,
    eventually,
    run_daemon,
    status_doc,
    write_config,
)
from captured.wire.frames import Record


def test_records_too_far_ahead_are_refused_by_both_encoder_paths() -> None:
    enc = LineEncoder(dcc())
    now = 1_700_000_000.0
    good = Record(b"1", b"2", "text/csv", "text/csv", now)
    ahead = Record(b"1", b"2", "text/csv", "text/csv", now + 301)
    assert enc.encode_uniform([good] * 3, "AllTraffic", lambda v: True, now + 300) is not None
    assert enc.encode_uniform([good, ahead], "AllTraffic", lambda v: True, now + 300) is None
    groups, invalid, empty, future = enc.group_lines(
        [good, ahead, ahead], "AllTraffic", lambda v: True, now + 300
    )
    assert (invalid, empty, future) == (0, 0, 2) and sum(len(g.lines) for g in groups.values()) == 1


def test_two_thousand_future_hours_beside_a_good_client(short_tmp: Path) -> None:
    """A hostile client sends 60 records with distinct future hours, then 2,000 in one batch,
    while a good client captures 1,000: every good record arrives, every future one is refused
    and counted (`future_time`), the spool holds one open file, and the counters add up."""
    cfg = write_config(short_tmp, extra_toml="[spool]\nmax_file_age_s = 3600\n")
    clock = FakeClock()

    async def main() -> None:
        async with run_daemon(cfg, clock=clock) as daemon:
            now = clock.wall()
            good = CaptureClient(cfg.socket_path)
            hostile = CaptureClient(cfg.socket_path, batch_bytes=16 << 20)
            try:
                for i in range(60):
                    assert hostile.capture(
                        b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 1)
                    )
                assert await asyncio.to_thread(hostile.flush)
                for i in range(2000):
                    hostile.capture(
                        b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 61)
                    )
                for i in range(1000):
                    assert good.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
                assert await asyncio.to_thread(hostile.flush, 20) and await asyncio.to_thread(good.flush, 20)
                status = status_doc(daemon)
                counters = status["counters"]
                assert counters["dropped"] == {"future_time": 2060}
                assert counters["received"] == counters["written"] + 2060 == 3060
                assert status["spool"]["open_files"] == 1
            finally:
                await asyncio.to_thread(good.close)
                await asyncio.to_thread(hostile.close)

    asyncio.run(main())  # stopping the daemon seals and delivers
    ids = sorted(int(r["eventMetadata"]["inferenceId"]) for r in delivered_lines(short_tmp))
    assert ids == list(range(1000))


def descriptors_but_the_clients(clients: list[CaptureClient]) -> int:
    """The descriptors open in this process but the clients' own (each client's wake pipe and
    socket): the daemon's, plus the test's, which stay the same throughout."""
    theirs: set[int] = set()
    for client in clients:
        theirs.update((client._wake_r, client._wake_w))
        io = client._io
        sock = io.sock if io is not None else None
        if sock is not None:
            theirs.add(sock.fileno())
    return sum(1 for fd in os.listdir("/proc/self/fd") if int(fd) not in theirs)


def test_future_hours_accepted_cannot_fill_a_small_spool_or_its_descriptors(
    short_tmp: Path, small_fs: Any
) -> None:
    """The attack as first seen, on a real 64 MiB spool filesystem (a tmpfs), with future hours
    let in (`ingest.max_future_s` = 100 days) so the open-file cap and the late reservation must
    hold on their own: 60 records with distinct future hours, then 2,000 in one batch, beside a
    good client's 1,000. Before, each file reserved 1 MiB ahead and stayed open: 60 of them
    filled the disk to 94 % and capture stopped. Now usage and descriptors stay bounded, every
    record of both clients arrives, and the counters add up.

    The daemon shares this process: its descriptors are this process's but the clients' own."""
    cfg = write_config(
        short_tmp, extra_toml="[spool]\nmax_file_age_s = 3600\n[ingest]\nmax_future_s = 8640000\n"
    )
    spool = small_fs(Path(cfg.spool_dir), "64m")
    clock = FakeClock()
    clients: list[CaptureClient] = []
    peak = {"used": 0, "fds": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            st = os.statvfs(spool)
            peak["used"] = max(peak["used"], (st.f_blocks - st.f_bfree) * st.f_frsize)
            peak["fds"] = max(peak["fds"], descriptors_but_the_clients(clients))
            time.sleep(0.005)

    async def main() -> int:
        async with run_daemon(cfg, clock=clock) as daemon:
            fds_before = descriptors_but_the_clients(clients)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            now = clock.wall()
            try:
                good = CaptureClient(cfg.socket_path)
                clients.append(good)
                bad = CaptureClient(cfg.socket_path, batch_bytes=16 << 20)
                clients.append(bad)
                try:
                    for i in range(60):
                        assert bad.capture(
                            b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 1)
                        )
                    assert await asyncio.to_thread(bad.flush, 20)
                    for i in range(2000):
                        assert bad.capture(
                            b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 61)
                        )
                    for i in range(1000):
                        assert good.capture(
                            f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i)
                        )
                    assert await asyncio.to_thread(bad.flush, 60) and await asyncio.to_thread(good.flush, 60)
                    status = status_doc(daemon)
                finally:
                    await asyncio.to_thread(good.close)
                    await asyncio.to_thread(bad.close)
            finally:
                done.set()
                await asyncio.to_thread(watcher.join)
            counters = status["counters"]
            assert counters["dropped"] == {}
            assert counters["received"] == counters["written"] == 3060
            assert status["spool"]["sealed_for_room"] >= 2060 - 64
            # Files sealed for room wait for the syncer (counted in open_files meanwhile) without a
            # descriptor; once it caught up, at most max_open_files remain open.
            await eventually(lambda: daemon.status().spool.open_files <= 64, timeout=30)
            return fds_before

    fds_before = asyncio.run(main())  # run_daemon checked that the daemon exited 0
    # 64 open files of a few hundred bytes, plus sealed ones waiting for delivery: far below the
    # watermark (75 %), where 60 files with 1 MiB reserved each took 94 %.
    assert peak["used"] < 16 * 1024 * 1024, peak
    assert peak["fds"] <= fds_before + 64 + 16, (peak, fds_before)
    lines = delivered_lines(short_tmp)
    good_ids = sorted(
        int(r["eventMetadata"]["inferenceId"]) for r in lines if "inferenceId" in r["eventMetadata"]
    )
    assert good_ids == list(range(1000))
    assert len(lines) == 3060
    assert not [p for p in Path(spool).iterdir() if p.name.endswith((".jsonl", ".part"))]
