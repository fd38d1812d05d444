"""One client cannot take the spool from the others: far-future hours are refused one by one,
open files are capped (see also tests/test_spool.py), and the others' records all arrive."""

from __future__ import annotations

import time
from typing import Any

from conftest import DaemonProcess
from test_hostile import dcc

from captured import CaptureClient
from captured.encode import LineEncoder
from captured.frames import Record


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


def test_two_thousand_future_hours_beside_a_good_client(daemon_factory: Any) -> None:
    """A hostile client sends 60 records with distinct future hours, then 2,000 in one batch,
    while a good client captures 1,000: every good record arrives, every future one is refused
    and counted (`future_time`), the spool holds one open file, and the counters add up."""
    d: DaemonProcess = daemon_factory(extra_toml="[spool]\nmax_file_age_s = 3600\n")
    d.start()
    now = time.time()
    good = CaptureClient(d.socket_path)
    hostile = CaptureClient(d.socket_path, batch_bytes=16 << 20)
    for i in range(60):
        assert hostile.capture(
            b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 1)
        )
    assert hostile.flush()
    for i in range(2000):
        hostile.capture(b"x", b"y", request_content_type="text/csv", inference_time=now + 3600 * (i + 61))
    for i in range(1000):
        assert good.capture(f"{i},1\n", "0", request_content_type="text/csv", inference_id=str(i))
    assert hostile.flush(timeout=20) and good.flush(timeout=20)
    status = d.status()
    counters = status["counters"]
    assert counters["dropped"] == {"future_time": 2060}
    assert counters["received"] == counters["written"] + 2060 == 3060
    assert status["spool"]["open_files"] == 1
    good.close()
    hostile.close()
    d.stop()
    ids = sorted(int(r["eventMetadata"]["inferenceId"]) for r in d.delivered_lines())
    assert ids == list(range(1000))
