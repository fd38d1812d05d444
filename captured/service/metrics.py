"""Prometheus metrics: the status document as counters and gauges, served over HTTP.

`render(status)` turns one `Daemon.status()` into the text exposition format with
prometheus-client (its formatting, escaping and content type, not ours); `MetricsServer` answers
`GET /metrics` on a TCP address (`127.0.0.1:9464`) or a Unix socket path, on the daemon's own
event loop, so every scrape reads the counters at one instant between two batches: they add up
(received = written + the drops of every reason). Records and capture state are labelled by
`endpoint`; the rest (spool, delivery, disk, clients) is the host's and has no endpoint label.
Labels stay low-cardinality: an endpoint, a drop reason, a failure cause, a close reason. Every
known drop reason, close reason and the common failure causes have a series from the start (at
0), so the identity and `rate()` work on a healthy daemon before the first drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from captured.daemon.ingest import CLOSE_REASONS
from captured.daemon.pipeline import DROP_REASONS, CounterStats
from captured.service.status import Status

log = logging.getLogger("captured.metrics")

#: A request line and headers larger than this are refused.
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


#: Delivery failure causes that get a series from the start (any other appears when it happens).
KNOWN_FAILURE_CAUSES = (
    "timeout",
    "connection",
    "throttled",
    "server_error",
    "access_denied",
    "bad_credentials",
    "no_such_bucket",
    "kms_key",
    "no_credentials",
    "uploader_exited",
    "disk_full",
    "internal",
)


M = TypeVar("M", CounterMetricFamily, GaugeMetricFamily)


def _received(c: CounterStats) -> float:
    return c.received


def _written(c: CounterStats) -> float:
    return c.written


def _remainder(total: CounterStats, parts: list[CounterStats]) -> CounterStats:
    """What `total` counts beyond `parts`."""
    dropped = dict(total.dropped)
    for part in parts:
        for reason, n in part.dropped.items():
            dropped[reason] = dropped.get(reason, 0) - n
    return CounterStats(
        received=total.received - sum(p.received for p in parts),
        written=total.written - sum(p.written for p in parts),
        dropped={k: v for k, v in dropped.items() if v},
        resent=total.resent - sum(p.resent for p in parts),
    )


def _with_zeros(known: tuple[str, ...], seen: dict[str, int]) -> dict[str, int]:
    """Every known label at 0 unless seen, so `rate()` and sums work before the first event."""
    return {**dict.fromkeys(known, 0), **seen}


class _StatusCollector:
    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status
        total = st.counters
        # Per endpoint: its records and capture state, labelled `endpoint`. Records no endpoint
        # took (refused as unknown_endpoint or undecodable, or counted by an endpoint a reload
        # removed) are the `endpoint=""` series, present once there are any: summed over
        # `endpoint`, every counter is the daemon's total.
        per: list[tuple[str, CounterStats]] = [(e.endpoint_name, e.counters) for e in st.endpoints]
        rest = _remainder(total, [c for _, c in per])
        if rest.received or rest.resent:
            per.append(("", rest))

        def family(
            kind: type[M], name: str, help_: str, rows: Sequence[tuple[list[str], float]], *labels: str
        ) -> M:
            m = kind(f"captured_{name}", help_, labels=list(labels))
            for values, value in rows:
                m.add_metric(values, value)
            return m

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return family(CounterMetricFamily, name, help_, [([], value)])

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return family(GaugeMetricFamily, name, help_, [([], value)])

        def by(name: str, help_: str, label: str, items: dict[str, int]) -> CounterMetricFamily:
            return family(
                CounterMetricFamily, name, help_, [([k], v) for k, v in sorted(items.items())], label
            )

        def each(kind: type[M], name: str, help_: str, value: Callable[[CounterStats], float]) -> M:
            return family(kind, name, help_, [([ep], value(c)) for ep, c in per], "endpoint")

        info = InfoMetricFamily("captured_build", "captured version")
        info.add_metric([], {"version": st.version})
        yield info
        yield each(CounterMetricFamily, "records_received", "Records read from clients", lambda c: c.received)
        yield each(
            CounterMetricFamily, "records_written", "Records written to the spool", lambda c: c.written
        )
        dropped = [
            ([ep, reason], n) for ep, c in per for reason, n in _with_zeros(DROP_REASONS, c.dropped).items()
        ]
        yield family(
            CounterMetricFamily,
            "records_dropped",
            "Records dropped, by reason",
            dropped,
            "endpoint",
            "reason",
        )
        yield each(
            CounterMetricFamily,
            "records_resent",
            "Records sent again that were already taken (skipped)",
            lambda c: c.resent,
        )
        endpoints = st.endpoints
        yield family(
            GaugeMetricFamily,
            "capture_enabled",
            "EnableCapture (1) or not (0)",
            [([e.endpoint_name], int(e.enable_capture)) for e in endpoints],
            "endpoint",
        )
        yield family(
            GaugeMetricFamily,
            "capture_started",
            "CaptureStatus Started (1) or Stopped (0)",
            [([e.endpoint_name], int(e.started)) for e in endpoints],
            "endpoint",
        )
        yield family(
            GaugeMetricFamily,
            "sampling_percentage",
            "Current sampling percentage",
            [([e.endpoint_name], e.current_sampling_percentage) for e in endpoints],
            "endpoint",
        )
        yield gauge("client_sessions", "Protocol 2 client sessions remembered", st.sessions.remembered)
        sp = st.spool
        yield gauge(
            "spool_open_files", "Spool files not yet handed to delivery (open or being sealed)", sp.open_files
        )
        yield counter("spool_files_sealed", "Spool files sealed", sp.files_sealed)
        yield counter("spool_written_bytes", "Bytes written to the spool", sp.bytes_written)
        d = st.delivery
        yield counter("delivery_files", "Files delivered", d.files_delivered)
        yield counter("delivery_bytes", "Bytes delivered", d.bytes_delivered)
        yield counter("delivery_retries", "Delivery attempts that failed and were retried", d.retries)
        yield by(
            "delivery_failures",
            "Failed delivery attempts, by cause",
            "cause",
            _with_zeros(KNOWN_FAILURE_CAUSES, d.failures),
        )
        yield gauge("delivery_files_waiting", "Sealed files waiting for delivery", d.files_waiting)
        yield gauge("delivery_waiting_bytes", "Bytes waiting for delivery", d.bytes_waiting)
        yield gauge("delivery_oldest_waiting_seconds", "Age of the oldest waiting file", d.oldest_waiting_s)
        if (z := st.compression) is not None:
            yield counter("compression_files", "Files compressed for delivery", z.files)
            yield counter("compression_plain_bytes", "Bytes of the files compressed", z.plain_bytes)
            yield counter("compression_compressed_bytes", "Bytes they compressed to", z.compressed_bytes)
            yield counter("compression_cpu_seconds", "CPU seconds spent compressing", z.cpu_s)
        w = st.watermark
        if w.used_percent is not None and w.free_bytes is not None:
            yield gauge("disk_used_percent", "Spool filesystem usage", w.used_percent)
            yield gauge("disk_free_bytes", "Spool filesystem free bytes", w.free_bytes)
        yield gauge("watermark_high_percent", "Capture stops at this usage", w.high_percent)
        yield gauge("watermark_low_percent", "Capture starts again at this usage", w.low_percent)
        yield counter("watermark_stops", "Times capture stopped for the disk", w.stops)
        ing = st.ingest
        yield gauge("clients_connected", "Client connections open", ing.connections)
        yield counter("client_connections", "Client connections accepted", ing.connections_total)
        yield by(
            "client_connections_closed",
            "Connections the daemon closed, by reason",
            "reason",
            _with_zeros(CLOSE_REASONS, ing.connections_closed),
        )
        yield gauge("uptime_seconds", "Seconds since the daemon started", st.uptime_s)


def render(status: Status) -> bytes:
    """The status in Prometheus' text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)


def parse_address(address: str) -> tuple[str, int] | str:
    """`host:port` (IPv6 as `[::1]:9464`) or an absolute Unix socket path."""
    if address.startswith("/"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"not host:port or /path: {address!r}")
    return host.strip("[]"), int(port)


class MetricsServer:
    def __init__(self, address: str, status: Callable[[], Status]) -> None:
        self.address = address
        self.status = status
        self._server: asyncio.Server | None = None
        self.bound = ""

    async def start(self) -> None:
        target = parse_address(self.address)
        if isinstance(target, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            self._server = await asyncio.start_unix_server(self._handle, path=target, limit=MAX_REQUEST_BYTES)
            self.bound = target
        else:
            self._server = await asyncio.start_server(
                self._handle, target[0], target[1], limit=MAX_REQUEST_BYTES
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            self.bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics", self.bound)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            if self.bound.startswith("/"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.bound)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method not in ("GET", "HEAD"):
                self._reply(writer, 405, b"only GET\n", "text/plain")
            elif path.split("?")[0] not in ("/metrics", "/"):
                self._reply(writer, 404, b"see /metrics\n", "text/plain")
            else:
                body = render(self.status())
                self._reply(writer, 200, b"" if method == "HEAD" else body, CONTENT_TYPE_LATEST, len(body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _reply(
        writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, length: int | None = None
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
