"""The hot path in-process (`captured.daemon.pipeline`): a real `Spool` in tmp_path, a real
`CaptureGate` reading an injected disk usage, the base (inline) `Syncer`.

Every test counts on both sides: the records sent, the pipeline's counters, and the lines the
spool files hold after `seal_all`. received = written + sum(dropped); resent apart.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from captured.daemon import pipeline as pipeline_module
from captured.daemon.pipeline import (
    CAPTURE_DISABLED,
    DISK_WATERMARK,
    DROP_REASONS,
    FUTURE_TIME,
    INVALID_RECORD,
    NOTHING_TO_CAPTURE,
    SAMPLED_OUT,
    UNKNOWN_ENDPOINT,
    WRITE_ERROR,
    CounterStats,
    Pipeline,
)
from captured.daemon.spool import Spool
from captured.daemon.watermark import WRITE_RETRY_S, CaptureGate, Usage
from captured.service.config import Config, load_config
from captured.wire import frames
from captured.wire.frames import Record

#: The pipeline's wall clock: records carry this time (the middle of an hour).
NOW = 1_779_000_000 // 3600 * 3600 + 1800.0
EMPTY_DISK = Usage(total=100 * 2**30, used=10 * 2**30, free=90 * 2**30, percent=10.0)
FULL_DISK = Usage(total=100 * 2**30, used=90 * 2**30, free=10 * 2**30, percent=90.0)


def write_config(
    root: Path, percentage: int = 100, enable: bool = True, modes: str = "Input, Output"
) -> Config:
    """A config from TOML as the daemon reads it; paths relative to the file (none absolute)."""
    path = root / f"captured-{percentage}-{enable}-{modes.replace(', ', '-')}.toml"
    capture = ", ".join(f'{{ CaptureMode = "{m.strip()}" }}' for m in modes.split(","))
    path.write_text(
        'endpoint_name = "ep"\n'
        'variant_name = "AllTraffic"\n'
        'socket_path = "c.sock"\n'
        'spool_dir = "spool"\n'
        "[DataCaptureConfig]\n"
        f"EnableCapture = {'true' if enable else 'false'}\n"
        f"InitialSamplingPercentage = {percentage}\n"
        'DestinationS3Uri = "s3://bucket/capture"\n'
        f"CaptureOptions = [{capture}]\n"
        "[DataCaptureConfig.CaptureContentTypeHeader]\n"
        'CsvContentTypes = ["text/csv"]\n'
    )
    return load_config(str(path))


@dataclass
class Disk:
    """What the gate's `usage` reads: the test fills and empties it."""

    usage: Usage = EMPTY_DISK
    reads: int = 0

    def __call__(self, path: str) -> Usage:
        self.reads += 1
        return self.usage


@dataclass
class Rig:
    cfg: Config
    spool: Spool
    gate: CaptureGate
    pipeline: Pipeline
    disk: Disk
    mono: list[float]
    sealed: list[tuple[str, int]] = field(default_factory=list)

    def lines_in_spool(self) -> int:
        """Seal every open file (inline syncer: at once), then count the lines on disk."""
        self.spool.seal_all()
        assert not list(Path(self.cfg.spool_dir).glob("*.part"))
        on_disk = sum(p.read_bytes().count(b"\n") for p in Path(self.cfg.spool_dir).glob("*.jsonl"))
        assert on_disk == sum(Path(p).read_bytes().count(b"\n") for p, _ in self.sealed)
        return on_disk


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(percentage: int = 100, enable: bool = True, modes: str = "Input, Output") -> Rig:
        cfg = write_config(tmp_path, percentage, enable, modes)
        sealed: list[tuple[str, int]] = []
        spool = Spool(cfg.spool_dir, cfg.spool, lambda p, n: sealed.append((p, n)), clock=lambda: NOW)
        disk = Disk()
        mono = [1000.0]
        gate = CaptureGate(cfg.spool_dir, cfg.watermark, usage=disk, clock=lambda: mono[0])
        rig = Rig(cfg, spool, gate, Pipeline(cfg, spool, gate, clock=lambda: NOW), disk, mono, sealed)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.spool.seal_all()  # closes every descriptor a failed test left open


def rec(i: int = 0, **kw: object) -> Record:
    fields: dict[str, object] = {
        "request": f"{i},2\n".encode(),
        "response": b"0.5",
        "request_content_type": "text/csv",
        "response_content_type": "text/csv",
        "inference_time": NOW,
        "inference_id": str(i),
    }
    fields.update(kw)
    return Record(**fields)  # type: ignore[arg-type]


def batch(records: list[Record] | list[object]) -> bytes:
    return msgspec.msgpack.encode(records)


def good(n: int, start: int = 0) -> list[Record]:
    return [rec(i) for i in range(start, start + n)]


def adds_up(stats: CounterStats) -> None:
    assert set(stats.dropped) <= set(DROP_REASONS)
    assert all(n > 0 for n in stats.dropped.values())  # a reason appears once it happened
    assert stats.received == stats.written + sum(stats.dropped.values())


def test_a_whole_batch_at_100_percent_is_written_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    assert rig.pipeline.process(batch(good(10))) == 10
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(received=10, written=10, dropped={}, resent=0)
    assert rig.lines_in_spool() == 10 and len(rig.sealed) == 1


def test_zero_percent_samples_out_every_record_and_writes_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(percentage=0)
    assert rig.pipeline.process(batch(good(25))) == 25
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(received=25, written=0, dropped={SAMPLED_OUT: 25}, resent=0)
    assert rig.lines_in_spool() == 0 and rig.sealed == []


def test_fifty_percent_keeps_about_half_and_the_rest_is_sampled_out(make_rig: Callable[..., Rig]) -> None:
    """2,000 records at 50 %: written + sampled_out = 2,000, each side within 9 standard
    deviations of 1,000, and the spool holds exactly the records counted written."""
    rig = make_rig(percentage=50)
    assert rig.pipeline.process(batch(good(2000))) == 2000
    stats = rig.pipeline.counters.statistics()
    adds_up(stats)
    assert stats.received == 2000 and set(stats.dropped) == {SAMPLED_OUT}
    assert 800 < stats.written < 1200 and stats.written + stats.dropped[SAMPLED_OUT] == 2000
    assert rig.lines_in_spool() == stats.written


def test_capture_disabled_drops_every_record(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(enable=False)
    assert rig.pipeline.process(batch(good(7))) == 7
    assert rig.pipeline.counters.statistics() == CounterStats(
        received=7, written=0, dropped={CAPTURE_DISABLED: 7}, resent=0
    )
    assert rig.lines_in_spool() == 0


def test_invalid_records_are_refused_one_by_one_and_their_batch_kept(make_rig: Callable[..., Rig]) -> None:
    """Two kinds of invalid: what the decoder refuses (a wrong shape, an empty inference id) and
    what the encoder refuses (a negative time, a variant name that would leave the tree). Each
    is counted `invalid_record`; the four good records around them are written."""
    rig = make_rig()
    records: list[object] = [
        rec(0),
        [1, 2, 3],  # not a record at all
        rec(1, inference_id=""),  # too short for the decoder
        rec(2),
        rec(3, inference_time=-1.0),
        rec(4, variant_name="../etc"),
        rec(5),
        rec(6),
    ]
    assert rig.pipeline.process(batch(records)) == 8
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(received=8, written=4, dropped={INVALID_RECORD: 4}, resent=0)
    adds_up(stats)
    assert rig.lines_in_spool() == 4


def test_a_record_with_no_captured_side_is_nothing_to_capture(make_rig: Callable[..., Rig]) -> None:
    """Output-only capture: a record without a response has nothing to write; neither has one
    without either body under Input and Output."""
    rig = make_rig(modes="Output")
    assert rig.pipeline.process(batch([rec(0), rec(1, response=None), rec(2), rec(3, response=None)])) == 4
    assert rig.pipeline.counters.statistics() == CounterStats(
        received=4, written=2, dropped={NOTHING_TO_CAPTURE: 2}, resent=0
    )
    assert rig.lines_in_spool() == 2


def test_records_too_far_ahead_of_the_clock_are_future_time(make_rig: Callable[..., Rig]) -> None:
    """At the limit (now + max_future_s) a record is kept; a second past it, refused: in a
    mixed batch and in a batch of future records only."""
    rig = make_rig()
    ahead = rig.cfg.ingest.max_future_s
    mixed = [rec(0), rec(1, inference_time=NOW + ahead), rec(2, inference_time=NOW + ahead + 1)]
    assert rig.pipeline.process(batch(mixed)) == 3
    assert rig.pipeline.process(batch([rec(i, inference_time=NOW + ahead + 60) for i in range(5)])) == 5
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(received=8, written=2, dropped={FUTURE_TIME: 6}, resent=0)
    assert rig.lines_in_spool() == 2


def test_a_full_disk_closes_the_gate_and_its_batches_drop_as_disk_watermark(
    make_rig: Callable[..., Rig],
) -> None:
    """The gate reads 90 % used (high_percent 75): closed, and the next batch is dropped whole.
    At 72 % (between low and high) it stays closed; at 10 % it opens and records are written."""
    rig = make_rig()
    rig.disk.usage = FULL_DISK
    assert rig.gate.check() is False
    assert rig.pipeline.process(batch(good(6))) == 6
    rig.disk.usage = Usage(100, 72, 28, 72.0)
    assert rig.gate.check() is False
    assert rig.pipeline.process(batch(good(4))) == 4
    rig.disk.usage = EMPTY_DISK
    assert rig.gate.check() is True
    assert rig.pipeline.process(batch(good(3))) == 3
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(received=13, written=3, dropped={DISK_WATERMARK: 10}, resent=0)
    assert rig.gate.statistics().stops == 1 and rig.disk.reads == 3
    assert rig.lines_in_spool() == 3


def test_a_failed_spool_write_is_write_error_and_stops_capture_until_the_retry(
    make_rig: Callable[..., Rig],
) -> None:
    """The spool directory is removed under the daemon (a real ENOENT at open): the batch is
    counted `write_error` and the gate closes; the next batch is `disk_watermark`. With the
    directory back and WRITE_RETRY_S passed on the gate's clock, capture opens on trial and
    writes again."""
    rig = make_rig()
    shutil.rmtree(rig.cfg.spool_dir)
    assert rig.pipeline.process(batch(good(5))) == 5
    assert not rig.gate.open and "spool write failed" in (rig.gate.reason or "")
    assert rig.pipeline.process(batch(good(2))) == 2
    Path(rig.cfg.spool_dir).mkdir()
    rig.mono[0] += WRITE_RETRY_S - 0.1
    assert rig.gate.check() is False  # not yet
    rig.mono[0] += 0.2
    assert rig.gate.check() is True
    assert rig.pipeline.process(batch(good(3))) == 3
    stats = rig.pipeline.counters.statistics()
    assert stats == CounterStats(
        received=10, written=3, dropped={WRITE_ERROR: 5, DISK_WATERMARK: 2}, resent=0
    )
    assert rig.lines_in_spool() == 3


def test_every_drop_reason_is_produced_by_some_test_here() -> None:
    """The reasons above are all of `DROP_REASONS`: a new reason needs a test here."""
    covered = {SAMPLED_OUT, CAPTURE_DISABLED, INVALID_RECORD, NOTHING_TO_CAPTURE, FUTURE_TIME}
    covered |= {DISK_WATERMARK, WRITE_ERROR, UNKNOWN_ENDPOINT}
    assert covered == set(DROP_REASONS)


@pytest.mark.parametrize("percentage", [100, 50, 0])
def test_a_record_naming_an_endpoint_the_daemon_lacks_is_unknown_endpoint(
    make_rig: Callable[..., Rig], percentage: int
) -> None:
    """3 records name "ep" (the only endpoint), 4 name none (they go to it), 5 name "other":
    the 5 are refused as unknown_endpoint, counted in the totals but not for "ep", and never
    written. At 0 % and 50 %, one endpoint sampling at random drops before decoding: a record it
    samples out counts for "ep" whatever it names (module docstring), so only the sums are exact."""
    rig = make_rig(percentage=percentage)
    named = [msgspec.structs.replace(r, endpoint_name="ep") for r in good(3)]
    other = [msgspec.structs.replace(r, endpoint_name="other") for r in good(5, start=10)]
    assert rig.pipeline.process(batch([*named, *good(4, start=3), *other])) == 12
    total = rig.pipeline.counters.statistics()
    mine = rig.pipeline.routes["ep"].counters.statistics()
    adds_up(total)
    adds_up(mine)
    assert total.received == 12 and rig.lines_in_spool() == total.written == mine.written
    unknown = total.dropped.get(UNKNOWN_ENDPOINT, 0)
    assert total.received == mine.received + unknown and UNKNOWN_ENDPOINT not in mine.dropped
    if percentage == 100:
        assert unknown == 5 and mine.written == 7
    elif percentage == 0:
        assert unknown == 0 and mine.dropped == {SAMPLED_OUT: 12}


@pytest.mark.parametrize("percentage", [100, 50])
def test_skipped_records_of_a_resent_frame_count_as_resent_not_received(
    make_rig: Callable[..., Rig], percentage: int
) -> None:
    """process(payload, skip=3) of 10 records: 3 resent, 7 received (and, at 100 %, written);
    it still returns 10, what the frame carried. A skip past the end skips the whole frame."""
    rig = make_rig(percentage=percentage)
    assert rig.pipeline.process(batch(good(10)), skip=3) == 10
    assert rig.pipeline.process(batch(good(4, start=10)), skip=20) == 4
    stats = rig.pipeline.counters.statistics()
    adds_up(stats)
    assert stats.resent == 3 + 4 and stats.received == 7
    if percentage == 100:
        assert stats == CounterStats(received=7, written=7, dropped={}, resent=7)
    lines = rig.lines_in_spool()
    assert lines == stats.written
    ids = sorted(
        int(line.split(b'"inferenceId":"')[1].split(b'"')[0])
        for p in Path(rig.cfg.spool_dir).glob("*.jsonl")
        for line in p.read_bytes().splitlines()
    )
    assert set(ids) <= set(range(3, 10)) and len(ids) == lines  # never one of the skipped


def test_large_batches_go_a_slice_at_a_time_and_still_add_up(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With slices of 100 records, 450 records of which 120 resent: resent 120, received 330
    across four slices, all written."""
    monkeypatch.setattr(pipeline_module, "SLICE_RECORDS", 100)
    rig = make_rig()
    assert rig.pipeline.process(batch(good(450)), skip=120) == 450
    assert rig.pipeline.counters.statistics() == CounterStats(
        received=330, written=330, dropped={}, resent=120
    )
    assert rig.lines_in_spool() == 330


def test_a_payload_that_is_not_an_array_raises_and_counts_nothing(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with pytest.raises(frames.ProtocolError) as info:
        rig.pipeline.process(b"\xa5hello")
    assert info.value.reason == "bad_payload"
    assert rig.pipeline.counters.statistics() == CounterStats(received=0, written=0, dropped={}, resent=0)


def test_reconfigure_switches_sampling_and_capture_from_the_next_batch(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """Batch 1 at 100 % is written; after `reconfigure` with a reloaded config at 0 %, batch 2 is
    sampled out; with EnableCapture false, batch 3 is capture_disabled; back at 100 %, batch 4
    is written again. Each batch's counts move only its own reason."""
    rig = make_rig(percentage=100)
    zero = write_config(tmp_path, percentage=0)
    disabled = write_config(tmp_path, enable=False)
    full = write_config(tmp_path, percentage=100)
    steps = [(None, 5, {}), (zero, 6, {SAMPLED_OUT: 6}), (disabled, 7, {SAMPLED_OUT: 6, CAPTURE_DISABLED: 7})]
    steps.append((full, 8, {SAMPLED_OUT: 6, CAPTURE_DISABLED: 7}))
    received = written = 0
    for dcc, n, dropped in steps:
        if dcc is not None:
            rig.pipeline.reconfigure(dcc)
        assert rig.pipeline.process(batch(good(n, start=received))) == n
        received += n
        written += n if dcc in (None, full) else 0
        assert rig.pipeline.counters.statistics() == CounterStats(
            received=received, written=written, dropped=dropped, resent=0
        )
    route = rig.pipeline.routes["ep"]
    assert route.percentage == 100 and route.enabled
    assert rig.lines_in_spool() == 5 + 8


def test_statistics_is_a_frozen_snapshot(make_rig: Callable[..., Rig]) -> None:
    """`statistics()` returns a frozen `CounterStats` that later batches do not change, and whose
    `dropped` is a copy (changing it does not touch the counters)."""
    rig = make_rig(percentage=0)
    rig.pipeline.process(batch(good(3)))
    before = rig.pipeline.counters.statistics()
    assert isinstance(before, CounterStats)
    with pytest.raises(AttributeError):
        before.received = 99  # type: ignore[misc]
    before.dropped[SAMPLED_OUT] = 1000
    rig.pipeline.process(batch(good(2)))
    after = rig.pipeline.counters.statistics()
    assert before.received == 3 and after.received == 5
    assert after.dropped == {SAMPLED_OUT: 5}
    assert msgspec.json.decode(msgspec.json.encode(after), type=CounterStats) == after


def test_counters_add_up_over_a_mixed_run(make_rig: Callable[..., Rig]) -> None:
    """Batches mixing every reason the pipeline meets at 100 % (invalid, future, nothing to
    capture, kept) and a resent frame: the sums hold and the spool holds the written ones."""
    rig = make_rig(modes="Output")
    ahead = NOW + rig.cfg.ingest.max_future_s + 10
    for round_ in range(20):
        base = round_ * 10
        records: list[object] = [rec(base), rec(base + 1, response=None), rec(base + 2, inference_time=ahead)]
        records += [[0], rec(base + 4), rec(base + 5, variant_name="Canary")]
        rig.pipeline.process(batch(records), skip=1 if round_ % 5 == 0 else 0)
    stats = rig.pipeline.counters.statistics()
    adds_up(stats)
    assert stats.resent == 4 and stats.received == 20 * 6 - 4
    assert stats.written == 20 * 3 - 4
    assert stats.dropped == {NOTHING_TO_CAPTURE: 20, FUTURE_TIME: 20, INVALID_RECORD: 20}
    assert rig.lines_in_spool() == stats.written
    assert {Path(p).name.split(".")[1] for p, _ in rig.sealed} == {"AllTraffic", "Canary"}
