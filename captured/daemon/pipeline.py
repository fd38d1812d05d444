"""The hot path: one BATCH payload -> decode -> route -> sample -> encode -> spool, counted by reason.

Everything here runs per batch: one msgspec decode for the whole batch, one pass to tell the
endpoints apart (a model server's batch names one), one comprehension for sampling, then the
encoder. A uniform batch (one endpoint, one variant, one hour, the same fields and content types
throughout) is encoded column by column and written at once; any other goes record by record
into one `encode_lines` and one write per (variant, hour) group.

Each endpoint is a `Route`: its live settings (capture on or off, sampling percentage and mode,
the encoder of its capture options and content types) and its counters. A record naming no
endpoint takes the default route; one naming an endpoint the daemon does not have, or naming
none when there is no default, is refused (`unknown_endpoint`), never written elsewhere.

Counters add up, per endpoint and in total: received = written + sum(dropped.values()). The
total also holds what no endpoint can be told for (records that do not decode, unknown
endpoints) and the counts of endpoints a reload removed. Records of a resent frame that the
daemon had already taken (protocol 2, see `ledger`) are skipped and counted apart as `resent`,
never as received twice nor as dropped.

With a single endpoint sampling at random, a record is dropped before it is decoded when
capture is disabled, the disk is past its watermark or sampling leaves it out (a few hundred
nanoseconds saved per record): such a record counts for that endpoint whatever endpoint it
names. Every other record is decoded first and counted for the endpoint it names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from captured.daemon.encode import LineEncoder
from captured.daemon.sample import INFERENCE_ID, sample, sample_by_id
from captured.daemon.spool import Spool
from captured.daemon.watermark import CaptureGate
from captured.errors import SpoolWriteError
from captured.service.config import Config, EndpointConfig
from captured.service.logs import RateLimited
from captured.wire import frames
from captured.wire.rules import valid_name

log = logging.getLogger("captured.pipeline")

# Drop reasons (counter labels).
SAMPLED_OUT = "sampled_out"
CAPTURE_DISABLED = "capture_disabled"
INVALID_RECORD = "invalid_record"
#: The record names an endpoint the daemon does not have (or none, and there is no default).
UNKNOWN_ENDPOINT = "unknown_endpoint"
WRITE_ERROR = "write_error"
DISK_WATERMARK = "disk_watermark"
#: A record with no captured side (say Output-only capture and no response): nothing to write.
NOTHING_TO_CAPTURE = "nothing_to_capture"
#: inferenceTime further ahead of the daemon's clock than `ingest.max_future_s`.
FUTURE_TIME = "future_time"

#: Every reason a record may be dropped for, in the order they are checked.
DROP_REASONS = (
    INVALID_RECORD,
    UNKNOWN_ENDPOINT,
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

    def add(self, other: Counters) -> None:
        self.received += other.received
        self.written += other.written
        self.resent += other.resent
        for reason, n in other.dropped.items():
            self.drop(reason, n)

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


@dataclass(slots=True)
class Route:
    """One endpoint: its live settings and its counters."""

    name: str
    enabled: bool
    percentage: int
    by_id: bool  # sampling_mode = "inference_id"
    encoder: LineEncoder
    default_variant: str
    counters: Counters

    @classmethod
    def of(cls, ep: EndpointConfig, counters: Counters | None = None) -> Route:
        dcc = ep.DataCaptureConfig
        return cls(
            name=ep.endpoint_name,
            enabled=dcc.EnableCapture,
            percentage=dcc.InitialSamplingPercentage,
            by_id=ep.sampling_mode == INFERENCE_ID,
            encoder=LineEncoder(dcc),
            default_variant=ep.variant_name,
            counters=counters if counters is not None else Counters(),
        )


class Pipeline:
    def __init__(
        self, cfg: Config, spool: Spool, gate: CaptureGate, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_future_s = cfg.ingest.max_future_s
        self._clock = clock
        self.spool = spool
        self.gate = gate
        self.routes: dict[str, Route] = {}
        self.default: Route | None = None
        #: Records no endpoint can be told for: they do not decode, or name an unknown endpoint.
        self.unrouted = Counters()
        #: What endpoints removed by a reload had counted (the totals never go back).
        self.retired = Counters()
        self._single: Route | None = None  # the only route, when there is one
        self._all_full = False  # every endpoint captures everything (the cheapest path)
        self._valid_variants: set[str] = set()
        self._warn = RateLimited(log)
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> list[str]:
        """Take the endpoints of `cfg` (added, removed, their live settings changed) from the next
        batch on; an endpoint that stays keeps its counters. Returns the names removed."""
        routes: dict[str, Route] = {}
        for ep in cfg.endpoint_configs:
            old = self.routes.get(ep.endpoint_name)
            routes[ep.endpoint_name] = Route.of(ep, old.counters if old is not None else None)
            self._valid_variants.add(ep.variant_name)
        removed = [name for name in self.routes if name not in routes]
        for name in removed:
            self.retired.add(self.routes[name].counters)
        self.routes = routes
        default = cfg.default_endpoint_name
        self.default = routes[default] if default is not None else None
        self._single = next(iter(routes.values())) if len(routes) == 1 else None
        self._all_full = all(r.enabled and r.percentage >= 100 for r in routes.values())
        return removed

    @property
    def counters(self) -> Counters:
        """The totals: every endpoint's, the unrouted and the retired counts."""
        total = Counters()
        total.add(self.unrouted)
        total.add(self.retired)
        for route in self.routes.values():
            total.add(route.counters)
        return total

    def process(self, payload: memoryview | bytes, skip: int = 0) -> int:
        """Process one BATCH payload; return how many records it carried.

        The first `skip` records were taken before (a resent frame): they are counted as
        `resent` and not processed again.

        The common case (every endpoint capturing everything, a client-sized batch) decodes the
        whole batch at once. Otherwise the batch is split into raw records first (cheap: no
        objects per field) and taken a slice at a time, so one 16 MiB frame of tiny records
        does not become ~700 MB of objects.

        Raises `frames.ProtocolError` when the payload is not an array at all.
        """
        if skip:
            raws = self._raws(payload)
            skipped = min(skip, len(raws))
            self.unrouted.resent += skipped
            for start in range(skipped, len(raws), SLICE_RECORDS):
                self._take_raws(raws[start : start + SLICE_RECORDS])
            return len(raws)
        if self._all_full and self.gate.open and len(payload) <= SLICE_BYTES:
            try:
                records = frames.batch_decoder.decode(payload)
                invalid = 0
            except (msgspec.DecodeError, UnicodeDecodeError):  # (msgspec raises the latter for bad UTF-8)
                records, invalid = self._decode_each(self._raws(payload))
            self._refuse(INVALID_RECORD, invalid)
            if records:
                self._dispatch(records)
            return len(records) + invalid
        raws = self._raws(payload)
        for start in range(0, len(raws), SLICE_RECORDS):
            self._take_raws(raws[start : start + SLICE_RECORDS])
        return len(raws)

    def _take_raws(self, raws: list[msgspec.Raw]) -> None:
        single = self._single
        if single is None or single.by_id:
            records, invalid = self._decode_each(raws)
            self._refuse(INVALID_RECORD, invalid)
            if records:
                self._dispatch(records)
            return
        # One endpoint sampling at random: drop before decoding what will not be written.
        c = single.counters
        n = len(raws)
        if not self._admit(single, n):
            return
        kept = sample(raws, single.percentage)
        c.drop(SAMPLED_OUT, n - len(kept))
        if not kept:
            return
        records, invalid = self._decode_each(kept)
        c.drop(INVALID_RECORD, invalid)
        if not records:
            return
        names = [r.endpoint_name for r in records]
        mine = names.count(None) + names.count(single.name)
        if mine < len(records):  # some name another endpoint: counted apart, not for this one
            c.received -= len(records) - mine
            self._refuse(UNKNOWN_ENDPOINT, len(records) - mine)
            records = [
                r for r, name in zip(records, names, strict=True) if name is None or name == single.name
            ]
        if records:
            self._write(single, records)

    def _dispatch(self, records: list[frames.Record]) -> None:
        """Decoded records to their endpoints: the whole batch when it names one (the common
        case, one C-level pass), else a group per endpoint in order of first appearance."""
        names = [r.endpoint_name for r in records]
        first = names[0]
        if names.count(first) == len(names):
            self._take(self._route(first), records)
            return
        groups: dict[str | None, list[frames.Record]] = {}
        for r, name in zip(records, names, strict=True):
            group = groups.get(name)
            if group is None:
                groups[name] = [r]
            else:
                group.append(r)
        for name, group in groups.items():
            self._take(self._route(name), group)

    def _route(self, name: str | None) -> Route | None:
        return self.default if name is None else self.routes.get(name)

    def _take(self, route: Route | None, records: list[frames.Record]) -> None:
        """Decoded records of one endpoint (None: unknown): counted, sampled, written."""
        n = len(records)
        if route is None:
            self._refuse(UNKNOWN_ENDPOINT, n)
            self._warn.warning(
                "endpoint",
                "refused %d record(s) for an endpoint this daemon does not have (%s)",
                n,
                records[0].endpoint_name or "none named, and no default_endpoint",
            )
            return
        if not self._admit(route, n):
            return
        c = route.counters
        if route.percentage < 100:
            records = (
                sample_by_id(records, route.percentage) if route.by_id else sample(records, route.percentage)
            )
            c.drop(SAMPLED_OUT, n - len(records))
        if records:
            self._write(route, records)

    def _admit(self, route: Route, n: int) -> bool:
        """Count `n` records received for `route`; False (and counted) when its capture is
        disabled or the disk is past its watermark."""
        c = route.counters
        c.received += n
        if not route.enabled:
            c.drop(CAPTURE_DISABLED, n)
            return False
        if not self.gate.open:
            c.drop(DISK_WATERMARK, n)
            return False
        return True

    def _refuse(self, reason: str, n: int) -> None:
        """`n` records no endpoint can be told for, dropped for `reason`."""
        if n:
            self.unrouted.received += n
            self.unrouted.drop(reason, n)

    def _write(self, route: Route, records: list[frames.Record]) -> None:
        encoder = route.encoder
        latest = self._clock() + self.max_future_s
        uniform = encoder.encode_uniform(records, route.default_variant, self._variant_ok, latest)
        if uniform is not None:  # the common case: one model server's batch, one write
            self._write_group(route, uniform.variant, uniform.hour, uniform.times, uniform.data, len(records))
            return
        groups, invalid, empty, future = encoder.group_lines(
            records, route.default_variant, self._variant_ok, latest
        )
        c = route.counters
        c.drop(NOTHING_TO_CAPTURE, empty)
        if future:
            c.drop(FUTURE_TIME, future)
            self._warn.warning(
                "future",
                "refused %d record(s) more than %gs ahead of this host's clock",
                future,
                self.max_future_s,
            )
        if invalid:
            c.drop(INVALID_RECORD, invalid)
            self._warn.warning(
                "invalid", "refused %d record(s): bad inferenceTime, variant name or metadata", invalid
            )
        for (variant, hour), group in groups.items():
            if not self.gate.open:  # a write of this batch failed just now
                c.drop(DISK_WATERMARK, len(group.lines))
                continue
            self._write_group(
                route, variant, hour, group.times, encoder.encode(group.lines), len(group.lines)
            )

    def _write_group(
        self, route: Route, variant: str, hour: int, times: list[float], data: bytes, n: int
    ) -> None:
        """One spool write of `n` encoded lines (`times`: their records' times), counted."""
        c = route.counters
        try:
            self.spool.write(route.name, variant, hour, times, data)
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
