"""One typed status: what SageMaker's DescribeEndpoint shows for capture, and what happened.

`Daemon.status()` composes every stage's frozen `statistics()` snapshot into one `Status`. The
STATUS reply carries it (MessagePack), `captured status --json` prints it as JSON,
`format_status` renders the text view, and the Prometheus collector reads it: all by attribute.
The SageMaker fields keep SageMaker's names in the document (`EndpointName`, ...).

Renamed keys (the document is otherwise what it was): `ingest.protocol_errors` is
`ingest.connections_closed` since 0.2.0: it also counts closes that are not protocol errors.
Since 0.3.0 `endpoints` lists every endpoint (a single one too), and the SageMaker fields at the
top may be None (several endpoints and no `default_endpoint`).
"""

from __future__ import annotations

import msgspec

from captured.daemon.ingest import IngestStats
from captured.daemon.ledger import SessionStats
from captured.daemon.pipeline import CounterStats
from captured.daemon.spool import SpoolStats
from captured.daemon.watermark import WatermarkStats
from captured.delivery.compressing import CompressionStats
from captured.delivery.queue import DeliveryStats


class EndpointStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One endpoint: what DescribeEndpoint shows for its capture, and its records."""

    endpoint_name: str = msgspec.field(name="EndpointName")
    variant_name: str = msgspec.field(name="VariantName")
    enable_capture: bool = msgspec.field(name="EnableCapture")
    #: "Started" or "Stopped".
    capture_status: str = msgspec.field(name="CaptureStatus")
    #: Why capture is Stopped (EnableCapture false, or the disk); None while Started.
    capture_status_reason: str | None = msgspec.field(name="CaptureStatusReason")
    current_sampling_percentage: int = msgspec.field(name="CurrentSamplingPercentage")
    destination_s3_uri: str = msgspec.field(name="DestinationS3Uri")
    kms_key_id: str | None = msgspec.field(name="KmsKeyId")
    #: "random" or "inference_id".
    sampling_mode: str
    counters: CounterStats

    @property
    def started(self) -> bool:
        return self.capture_status == "Started"


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon. The SageMaker fields at the top are the default endpoint's (the single
    endpoint's), None when several endpoints have no default; `endpoints` has each one;
    `counters` are the totals (every endpoint's, plus records no endpoint took)."""

    endpoint_name: str | None = msgspec.field(name="EndpointName")
    variant_name: str | None = msgspec.field(name="VariantName")
    enable_capture: bool | None = msgspec.field(name="EnableCapture")
    #: "Started" or "Stopped".
    capture_status: str | None = msgspec.field(name="CaptureStatus")
    #: Why capture is Stopped (EnableCapture false, or the disk); None while Started.
    capture_status_reason: str | None = msgspec.field(name="CaptureStatusReason")
    current_sampling_percentage: int | None = msgspec.field(name="CurrentSamplingPercentage")
    destination_s3_uri: str | None = msgspec.field(name="DestinationS3Uri")
    kms_key_id: str | None = msgspec.field(name="KmsKeyId")
    endpoints: list[EndpointStatus]
    counters: CounterStats
    spool: SpoolStats
    watermark: WatermarkStats
    delivery: DeliveryStats
    #: With `delivery.compression = "zstd"`; None without.
    compression: CompressionStats | None = None
    ingest: IngestStats
    sessions: SessionStats
    socket_path: str
    #: Where /metrics answers (`host:port` or a socket path); None when off.
    metrics: str | None
    uptime_s: float
    version: str
    pid: int

    @property
    def started(self) -> bool:
        """Capture is Started for the default endpoint, or (without one) for any endpoint."""
        if self.capture_status is not None:
            return self.capture_status == "Started"
        return any(e.started for e in self.endpoints)


_decoder = msgspec.msgpack.Decoder(Status)


def decode(payload: bytes | memoryview) -> Status:
    """A STATUS reply's payload."""
    return _decoder.decode(payload)


def to_json(status: Status) -> str:
    """`captured status --json`: the document, keys sorted, indented."""
    import json

    return json.dumps(msgspec.to_builtins(status), indent=2, sort_keys=True)


def _pairs(items: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(items.items())) or "none"


def format_status(st: Status) -> str:
    """`captured status` for people: one line per aspect; `--json` has it all."""
    c, d, w, ing, sp = st.counters, st.delivery, st.watermark, st.ingest, st.spool
    reason = f" ({st.capture_status_reason})" if st.capture_status_reason else ""
    disk = "unknown"
    if w.used_percent is not None and w.free_bytes is not None:
        disk = (
            f"{w.used_percent:.1f}% used, {w.free_bytes / 1e9:.1f} GB free "
            f"(stops at {w.high_percent:g}%, starts again at {w.low_percent:g}%"
            + (f", or below {w.min_free_bytes} bytes free" if w.min_free_bytes else "")
            + f"; stopped {w.stops} time(s))"
        )
    lines = []
    if st.endpoint_name is not None and len(st.endpoints) <= 1:
        lines += [
            f"endpoint            {st.endpoint_name} (default variant {st.variant_name})",
            f"CaptureStatus       {st.capture_status}{reason}",
            f"EnableCapture       {str(st.enable_capture).lower()}",
            f"sampling            {st.current_sampling_percentage}%"
            + ("" if not st.endpoints or st.endpoints[0].sampling_mode == "random" else " by inference id"),
            f"destination         {st.destination_s3_uri}"
            + (f" (SSE-KMS {st.kms_key_id})" if st.kms_key_id else ""),
        ]
    else:
        for e in st.endpoints:
            lines += _endpoint_lines(e, default=e.endpoint_name == st.endpoint_name)
    lines += [
        f"records             received {c.received}, written {c.written}, "
        f"dropped: {_pairs(c.dropped)}; resent (skipped) {c.resent}"
        + (" (all endpoints)" if len(st.endpoints) > 1 else ""),
        f"files               open {sp.open_files}, sealed {sp.files_sealed}, "
        f"delivered {d.files_delivered}, waiting {d.files_waiting} "
        f"({d.bytes_waiting} bytes, oldest {d.oldest_waiting_s:.0f}s)",
        f"delivery            {d.bytes_delivered} bytes delivered, {d.retries} retries, "
        f"failures: {_pairs(d.failures)}",
        *_compression_lines(st.compression),
        f"disk                {disk}",
        f"clients             {ing.connections} connected, {ing.connections_total} so far, "
        f"closed by the daemon: {_pairs(ing.connections_closed)}",
        f"sessions            {st.sessions.remembered} remembered, journal {st.sessions.journal_bytes} bytes"
        + ("" if st.sessions.journal_ok else " (CANNOT BE WRITTEN: acknowledgements wait)"),
        f"uptime              {st.uptime_s:.0f}s, version {st.version}, pid {st.pid}"
        + (f", metrics on {st.metrics}" if st.metrics else ""),
    ]
    return "\n".join(lines) + "\n"


def _endpoint_lines(e: EndpointStatus, *, default: bool) -> list[str]:
    reason = f" ({e.capture_status_reason})" if e.capture_status_reason else ""
    mode = "" if e.sampling_mode == "random" else " by inference id"
    c = e.counters
    return [
        f"endpoint            {e.endpoint_name}{' (default)' if default else ''},"
        f" default variant {e.variant_name}",
        f"  CaptureStatus     {e.capture_status}{reason}, EnableCapture {str(e.enable_capture).lower()},"
        f" sampling {e.current_sampling_percentage}%{mode}",
        f"  destination       {e.destination_s3_uri}"
        + (f" (SSE-KMS {e.kms_key_id})" if e.kms_key_id else ""),
        f"  records           received {c.received}, written {c.written}, dropped: {_pairs(c.dropped)}",
    ]


def _compression_lines(z: CompressionStats | None) -> list[str]:
    if z is None:
        return []
    ratio = z.plain_bytes / z.compressed_bytes if z.compressed_bytes else 0.0
    return [
        f"compression         zstd level {z.level}: {z.files} files, {z.plain_bytes} -> {z.compressed_bytes}"
        f" bytes (ratio {ratio:.1f}, estimated {z.estimated_ratio:.1f}), {z.cpu_s:.1f} CPU s"
    ]
