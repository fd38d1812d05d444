"""The hot path: one BATCH payload -> decode -> sample -> encode -> spool, counted by reason.

Everything here runs per batch: one msgspec decode for the whole batch, one comprehension for
sampling, then the encoder. A uniform batch (one model server's: one variant, one hour, the same
fields and content types throughout) is encoded column by column and written at once; any other
goes record by record into one `encode_lines` and one write per (variant, hour) group.

Counters add up: received = written + sum(dropped.values()). Records of a resent frame that the
daemon had already taken (protocol 2, see `ledger`) are skipped and counted apart as `resent`,
never as received twice nor as dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from captured.daemon.encode import LineEncoder
from captured.daemon.sample import sample
from captured.daemon.spool import Spool
from captured.daemon.watermark import CaptureGate
from captured.errors import SpoolWriteError
from captured.service.config import Config
from captured.service.datacapture import DataCaptureConfig
from captured.service.logs import RateLimited
from captured.wire import frames
from captured.wire.rules import valid_name

log = logging.getLogger("captured.pipeline")

# Drop reasons (counter labels).
SAMPLED_OUT = "sampled_out"
CAPTURE_DISABLED = "capture_disabled"
INVALID_RECORD = "invalid_record"
WRITE_ERROR = "write_error"
DISK_WATERMARK = "disk_watermark"
#: A record with no captured side (say Output-only capture and no response): nothing to write.
NOTHING_TO_CAPTURE = "nothing_to_capture"
#: inferenceTime further ahead of the daemon's clock than `ingest.max_future_s`.
FUTURE_TIME = "future_time"

#: Every reason a record may be dropped for, in the order they are checked.
DROP_REASONS = (
    INVALID_RECORD,
    FUTURE_TIME,
    CAPTURE_DISABLED,
    SAMPLED_OUT,
    NOTHING_TO_CAPTURE,
    DISK_WATERMARK,
    WRITE_ERROR,
)

#: Distinct variant names the daemon accepts over its lifetime (each may hold open files).
MAX_VARIANTS = 256
#: Batches larger than this are decoded and written a slice at a time.
SLICE_BYTES = 1024 * 1024
SLICE_RECORDS = 4096


@dataclass(slots=True)
class Counters:
    received: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    resent: int = 0  # records sent again that were already taken: skipped, not received

    def drop(self, reason: str, n: int) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def statistics(self) -> CounterStats:
        return CounterStats(
            received=self.received, written=self.written, dropped=dict(self.dropped), resent=self.resent
        )


class CounterStats(msgspec.Struct, frozen=True):
    """received = written + sum(dropped); `resent` records were skipped, not received."""

    received: int
    written: int
    #: By reason (`DROP_REASONS`); a reason appears once it happened.
    dropped: dict[str, int]
    #: Records a protocol 2 client sent again that the daemon had already taken.
    resent: int


class Pipeline:
    def __init__(
        self, cfg: Config, spool: Spool, gate: CaptureGate, *, clock: Callable[[], float] = time.time
    ) -> None:
        dcc = cfg.DataCaptureConfig
        self.enabled = dcc.EnableCapture
        self.percentage = dcc.InitialSamplingPercentage
        self.encoder = LineEncoder(dcc)
        self.default_variant = cfg.variant_name
        self.max_future_s = cfg.ingest.max_future_s
        self._clock = clock
        self.spool = spool
        self.gate = gate
        self.counters = Counters()
        self._valid_variants = {cfg.variant_name}
        self._warn = RateLimited(log)

    def reconfigure(self, dcc: DataCaptureConfig) -> None:
        """Take a reloaded DataCaptureConfig (sampling, EnableCapture, options, content types)
        from the next batch on."""
        self.enabled = dcc.EnableCapture
        self.percentage = dcc.InitialSamplingPercentage
        self.encoder = LineEncoder(dcc)

    def process(self, payload: memoryview | bytes, skip: int = 0) -> int:
        """Process one BATCH payload; return how many records it carried.

        The first `skip` records were taken before (a resent frame): they are counted as
        `resent` and not processed again.

        The common case (100 %, capturing, a client-sized batch) decodes the whole batch at
        once. Otherwise the batch is split into raw records first (cheap: no objects per field)
        and only the records that will be written are decoded: a record sampled out, or read
        while capture is stopped, costs almost nothing. Large batches go a slice at a time, so
        one 16 MiB frame of tiny records does not become ~700 MB of objects.

        Raises `frames.ProtocolError` when the payload is not an array at all.
        """
        if skip:
            raws = self._raws(payload)
            skipped = min(skip, len(raws))
            self.counters.resent += skipped
            for start in range(skipped, len(raws), SLICE_RECORDS):
                self._take_raws(raws[start : start + SLICE_RECORDS])
            return len(raws)
        if self.percentage >= 100 and self.enabled and self.gate.open and len(payload) <= SLICE_BYTES:
            try:
                records = frames.batch_decoder.decode(payload)
                invalid = 0
            except (msgspec.DecodeError, UnicodeDecodeError):  # (msgspec raises the latter for bad UTF-8)
                records, invalid = self._decode_each(self._raws(payload))
            c = self.counters
            c.received += len(records) + invalid
            c.drop(INVALID_RECORD, invalid)
            if records:
                self._write(records)
            return len(records) + invalid
        raws = self._raws(payload)
        for start in range(0, len(raws), SLICE_RECORDS):
            self._take_raws(raws[start : start + SLICE_RECORDS])
        return len(raws)

    def _take_raws(self, raws: list[msgspec.Raw]) -> None:
        c = self.counters
        n = len(raws)
        c.received += n
        if not self.enabled:
            c.drop(CAPTURE_DISABLED, n)
            return
        if not self.gate.open:
            c.drop(DISK_WATERMARK, n)
            return
        kept = sample(raws, self.percentage)
        c.drop(SAMPLED_OUT, n - len(kept))
        if kept:
            records, invalid = self._decode_each(kept)
            c.drop(INVALID_RECORD, invalid)
            if records:
                self._write(records)

    def _write(self, records: list[frames.Record]) -> None:
        encoder = self.encoder
        latest = self._clock() + self.max_future_s
        uniform = encoder.encode_uniform(records, self.default_variant, self._variant_ok, latest)
        if uniform is not None:  # the common case: one model server's batch, one write
            self._write_group(uniform.variant, uniform.hour, uniform.times, uniform.data, len(records))
            return
        groups, invalid, empty, future = encoder.group_lines(
            records, self.default_variant, self._variant_ok, latest
        )
        self.counters.drop(NOTHING_TO_CAPTURE, empty)
        if future:
            self.counters.drop(FUTURE_TIME, future)
            self._warn.warning(
                "future",
                "refused %d record(s) more than %gs ahead of this host's clock",
                future,
                self.max_future_s,
            )
        if invalid:
            self.counters.drop(INVALID_RECORD, invalid)
            self._warn.warning(
                "invalid", "refused %d record(s): bad inferenceTime, variant name or metadata", invalid
            )
        for (variant, hour), group in groups.items():
            if not self.gate.open:  # a write of this batch failed just now
                self.counters.drop(DISK_WATERMARK, len(group.lines))
                continue
            self._write_group(variant, hour, group.times, encoder.encode(group.lines), len(group.lines))

    def _write_group(self, variant: str, hour: int, times: list[float], data: bytes, n: int) -> None:
        """One spool write of `n` encoded lines (`times`: their records' times), counted."""
        c = self.counters
        try:
            self.spool.write(variant, hour, times, data)
        except SpoolWriteError as exc:
            # Pieces written to earlier files before the failure are in the spool: count them.
            kept = data.count(b"\n", 0, exc.written)
            c.written += kept
            c.drop(WRITE_ERROR, n - kept)
            self._warn.warning("write", "spool write failed, %d record(s) dropped: %s", n - kept, exc)
            self.gate.write_failed(exc)
            return
        c.written += n
        self.gate.written(len(data))

    def _variant_ok(self, name: str) -> bool:
        """Variant names become path components: SageMaker's pattern, remembered once seen.

        At most `MAX_VARIANTS` distinct names are admitted, so a client cannot grow the set
        (and the number of open files) without bound.
        """
        if name in self._valid_variants:
            return True
        if len(self._valid_variants) >= MAX_VARIANTS or not valid_name(name):
            return False
        self._valid_variants.add(name)
        return True

    @staticmethod
    def _raws(payload: memoryview | bytes) -> list[msgspec.Raw]:
        try:
            raws: list[msgspec.Raw] = frames.raw_list_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise frames.ProtocolError(
                reason="bad_payload", message=f"BATCH payload is not an array: {exc}"
            ) from None
        return raws

    def _decode_each(self, raws: list[msgspec.Raw]) -> tuple[list[frames.Record], int]:
        """Records one by one: keep the valid ones, count the others."""
        good: list[frames.Record] = []
        bad = 0
        decode = frames.record_decoder.decode
        for raw in raws:
            try:
                good.append(decode(raw))
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                bad += 1
                self._warn.warning("schema", "refused a record that does not match the schema: %s", exc)
        return good, bad
