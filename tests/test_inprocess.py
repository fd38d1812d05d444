"""The daemon in the test's own event loop on a fake clock (`captured.testing.inprocess`):
behaviour that takes hours of wall time, checked in a second."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from captured.client.aio import AsyncCaptureClient
from captured.service.config import Config, load_config
from captured.testing.inprocess import FakeClock, daemon_ticks, run_daemon

HOUR = 3600


def config(root: Path, extra: str = "") -> Config:
    path = root / "captured.toml"
    path.write_text(
        'endpoint_name = "e"\n'
        f'socket_path = "{root / "c.sock"}"\n'
        f'spool_dir = "{root / "spool"}"\n' + extra + "[DataCaptureConfig]\nInitialSamplingPercentage = 100\n"
        f'DestinationS3Uri = "file://{root / "out"}"\n'
        'CaptureOptions = [{ CaptureMode = "Input" }]\n'
        '[DataCaptureConfig.CaptureContentTypeHeader]\nCsvContentTypes = ["text/csv"]\n'
    )
    return load_config(str(path))


def delivered(root: Path) -> dict[str, list[str]]:
    """Relative key -> the inference ids in that file."""
    return {
        str(p.relative_to(root / "out")): [
            json.loads(line)["eventMetadata"]["inferenceId"] for line in p.read_text().splitlines()
        ]
        for p in sorted((root / "out").rglob("*.jsonl"))
    }


def test_an_hour_passes_on_the_fake_clock_and_files_rotate_into_their_hours(short_tmp: Path) -> None:
    """Records captured at 10:59:59 and 11:00:30 (fake wall time) land in files of their own
    hour; an hour later (fake monotonic time) the daemon's heartbeat seals the open file by age
    and delivers it. The counters add up throughout, read from the typed status."""
    clock = FakeClock(wall=time.mktime((2026, 12, 3, 10, 59, 59, 0, 0, 0)) - time.timezone)

    async def main() -> None:
        cfg = config(short_tmp, "[spool]\nmax_file_age_s = 3600\n")
        async with run_daemon(cfg, clock=clock) as daemon:
            async with AsyncCaptureClient(cfg.socket_path) as client:
                # The model server's clock is the fake one too (records carry their own time).
                assert client.capture(
                    b"1,2",
                    None,
                    request_content_type="text/csv",
                    inference_id="a",
                    inference_time=clock.wall(),
                )
                assert await client.flush(timeout=10)
                clock.advance(31)  # 11:00:30: the next record opens the 11 o'clock file
                assert client.capture(
                    b"3,4",
                    None,
                    request_content_type="text/csv",
                    inference_id="b",
                    inference_time=clock.wall(),
                )
                assert await client.flush(timeout=10)
            st = daemon.status()
            assert (st.counters.received, st.counters.written, st.counters.dropped) == (2, 2, {})
            assert st.spool.open_files == 2 and st.delivery.files_delivered == 0
            clock.advance(HOUR)  # both files are now an hour old: sealed by age, delivered
            await daemon_ticks(daemon)
            for _ in range(100):
                if daemon.status().delivery.files_delivered == 2:
                    break
                await asyncio.sleep(0.02)
            st = daemon.status()
            assert st.spool.open_files == 0 and st.delivery.files_delivered == 2
            assert st.uptime_s >= HOUR

    asyncio.run(main())
    files = delivered(short_tmp)
    assert [(k.split("/")[2:6], ids) for k, ids in files.items()] == [
        (["2026", "12", "03", "10"], ["a"]),
        (["2026", "12", "03", "11"], ["b"]),
    ]


def test_an_in_process_daemon_stops_in_order_and_leaves_an_empty_spool(short_tmp: Path) -> None:
    """Stopping (as SIGTERM) seals what is open and delivers it: nothing stays in the spool but
    the lock and the journal, and the signal handlers the daemon installed are gone again."""

    async def main() -> None:
        cfg = config(short_tmp)
        async with run_daemon(cfg) as daemon, AsyncCaptureClient(cfg.socket_path) as client:
            for i in range(100):
                assert client.capture(f"{i},1", None, request_content_type="text/csv", inference_id=str(i))
            assert await client.flush(timeout=10)
            assert daemon.status().spool.open_files == 1
        loop = asyncio.get_running_loop()
        import signal

        assert not loop.remove_signal_handler(signal.SIGTERM)

    asyncio.run(main())
    assert sorted(int(i) for ids in delivered(short_tmp).values() for i in ids) == list(range(100))
    assert {p.name for p in (short_tmp / "spool").iterdir()} == {".lock", ".journal"}
