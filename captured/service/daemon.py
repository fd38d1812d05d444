"""Builds the stages from the config and owns start-up and shutdown order.

Start-up: recover what a previous run left in the spool (torn `.part` files cut to whole lines
and sealed; sealed files queued for delivery), start delivery, bind the socket, then say ready.

Shutdown (SIGTERM or SIGINT): stop accepting, keep reading what connected clients already sent
until they go quiet (bounded by `ingest.drain_timeout_s`), seal every open file, deliver what is
sealed (bounded by `s3.shutdown_timeout_s`; what is left stays in the spool for the next
start), exit 0. A second SIGINT exits at once (exit 130); the spool is recovered next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from captured import __version__
from captured.daemon import recovery
from captured.daemon.ingest import IngestServer
from captured.daemon.ledger import Ledger
from captured.daemon.pipeline import Pipeline
from captured.daemon.sample import INFERENCE_ID
from captured.daemon.spool import Spool
from captured.daemon.syncer import ThreadSyncer
from captured.daemon.watermark import CaptureGate
from captured.delivery.compress import CompressResult, RatioEstimate
from captured.delivery.compressing import Compressing
from captured.delivery.queue import Delivery, Destination
from captured.delivery.router import Router
from captured.service import listen, systemd
from captured.service.config import SINGLE_FORM_KEYS, Config, EndpointConfig
from captured.service.process import raise_open_files_limit, tune_malloc
from captured.service.status import EndpointStatus, Status
from captured.wire.rules import SOCKET_ENV

if TYPE_CHECKING:
    from captured.service.metrics import MetricsServer

log = logging.getLogger("captured.daemon")

TICK_S = 0.25
#: Exit status after an unexpected failure (BSD's EX_SOFTWARE): systemd's Restart=on-failure.
EXIT_FAILED = 70

#: How often the one-line STATUS= for systemd is refreshed.
STATUS_EVERY_S = 5.0

#: Settings of the daemon a reload may change; any other difference refuses the whole reload.
LIVE_SETTINGS = ("watermark", "default_endpoint")
#: Settings of an endpoint a reload may not change (everything else of it is live); endpoints
#: themselves may be added and removed.
FIXED_ENDPOINT_SETTINGS = ("DataCaptureConfig.DestinationS3Uri", "DataCaptureConfig.KmsKeyId", "variant_name")
#: Where the endpoints are declared (compared endpoint by endpoint, not key by key).
ENDPOINT_KEYS = (*SINGLE_FORM_KEYS, "endpoints", "default_endpoint")


class Clock:
    """Where the daemon's stages read the time: the wall clock (record and file times) and the
    monotonic one (file ages, retry backoff, the watermark's pace). Tests pass their own."""

    wall: Callable[[], float] = staticmethod(time.time)
    monotonic: Callable[[], float] = staticmethod(time.monotonic)


class Daemon:
    def __init__(
        self, cfg: Config, reload: Callable[[], Config] | None = None, *, clock: Clock | None = None
    ) -> None:
        self.cfg = cfg
        self._reload = reload
        self.clock = clock = clock or Clock()
        #: Set once the daemon listens and has told systemd it is ready.
        self.ready = asyncio.Event()
        # Read (and removed from the environment) before any child process starts.
        self.notifier = systemd.Notifier()
        self.watchdog_s = systemd.watchdog_interval()
        self.inherited = systemd.listen_fds()
        self.started_at = clock.wall()
        #: With compression: how well recent files compressed, which sizes the plain spool files.
        self.estimate = RatioEstimate()
        self.delivery, self.router, self.compressing = make_delivery(
            cfg, clock, on_compressed=self._compressed, estimate=lambda: self.estimate.ratio
        )
        self.ledger = Ledger(cfg.spool_dir)
        self.spool = Spool(
            cfg.spool_dir,
            cfg.spool,
            self.delivery.submit,
            syncer=ThreadSyncer(asyncio.get_running_loop()),
            ledger=self.ledger,
            clock=clock.wall,
            monotonic=clock.monotonic,
        )
        self.gate = CaptureGate(cfg.spool_dir, cfg.watermark, clock=clock.monotonic)
        self.pipeline = Pipeline(cfg, self.spool, self.gate, clock=clock.wall)
        ing = cfg.ingest
        self.ingest = IngestServer(
            self.pipeline,
            self.ledger,
            max_frame_bytes=ing.max_frame_bytes,
            status=self.status,
            max_connections=ing.max_connections,
            buffer_budget_bytes=ing.max_buffered_bytes,
            frame_timeout_s=ing.frame_timeout_s,
            allowed_uids=ing.allowed_uids,
            allowed_gids=ing.allowed_gids,
        )
        self.metrics: MetricsServer | None = None
        if cfg.metrics.address:
            from captured.service.metrics import MetricsServer  # prometheus-client is loaded only when used

            self.metrics = MetricsServer(cfg.metrics.address, self.status)
        self._stop = asyncio.Event()
        self._signals = 0
        self._last_signal = 0
        self.inherited_socket = False

    def endpoint_status(self, ep: EndpointConfig) -> EndpointStatus:
        """What DescribeEndpoint shows for one endpoint's capture, and its records."""
        route = self.pipeline.routes[ep.endpoint_name]
        capturing = route.enabled and self.gate.open
        reason = None if capturing else ("EnableCapture is false" if not route.enabled else self.gate.reason)
        dcc = ep.DataCaptureConfig
        return EndpointStatus(
            endpoint_name=ep.endpoint_name,
            variant_name=route.default_variant,
            enable_capture=route.enabled,
            capture_status="Started" if capturing else "Stopped",
            capture_status_reason=reason,
            current_sampling_percentage=route.percentage,
            destination_s3_uri=dcc.DestinationS3Uri,
            kms_key_id=dcc.KmsKeyId,
            sampling_mode=ep.sampling_mode,
            counters=route.counters.statistics(),
        )

    def status(self) -> Status:
        """What SageMaker's DescribeEndpoint shows for capture, and what happened so far."""
        endpoints = [self.endpoint_status(ep) for ep in self.cfg.endpoint_configs]
        default = next((e for e in endpoints if e.endpoint_name == self.cfg.default_endpoint_name), None)
        return Status(
            endpoint_name=default.endpoint_name if default else None,
            variant_name=default.variant_name if default else None,
            enable_capture=default.enable_capture if default else None,
            capture_status=default.capture_status if default else None,
            capture_status_reason=default.capture_status_reason if default else None,
            current_sampling_percentage=default.current_sampling_percentage if default else None,
            destination_s3_uri=default.destination_s3_uri if default else None,
            kms_key_id=default.kms_key_id if default else None,
            endpoints=endpoints,
            counters=self.pipeline.counters.statistics(),
            spool=self.spool.statistics(),
            watermark=self.gate.statistics(),
            delivery=self.delivery.statistics(),
            compression=self.compressing.statistics() if self.compressing is not None else None,
            ingest=self.ingest.stats.statistics(),
            sessions=self.ledger.statistics(),
            socket_path=self.cfg.socket_path,
            metrics=self.metrics.bound if self.metrics is not None else None,
            uptime_s=round(self.clock.wall() - self.started_at, 3),
            version=__version__,
            pid=os.getpid(),
        )

    def _compressed(self, result: CompressResult) -> None:
        """A file was compressed: learn its ratio, and let the spool's plain files grow so that
        compressed objects come out near `spool.max_file_bytes` (`compress.RatioEstimate`)."""
        self.estimate.observe(result)
        self.spool.max_bytes = self.estimate.plain_limit(self.cfg.spool.max_file_bytes)

    def recover(self) -> None:
        """Take back what an earlier run left in the spool (`recovery.recover`) and queue it."""
        names = [ep.endpoint_name for ep in self.cfg.endpoint_configs]
        for path, size in recovery.recover(self.cfg.spool_dir, names, self.ledger):
            self.delivery.submit(path, size, recovered=True)
        if self.ledger.sessions:
            log.info("journal: %d client session(s) remembered", len(self.ledger.sessions))

    async def run(self) -> int:
        """Start in order, serve until SIGTERM/SIGINT, stop in order; 0, or 1 if it cannot start.

        Every acquired resource has its release on one `AsyncExitStack`, and the long-lived
        tasks run in one `TaskGroup`: a task that fails (a bug) cancels the others and the
        exception leaves `run` (`serve` logs it and exits non-zero, so systemd restarts the
        daemon, which recovers the spool), instead of leaving ingest accepting with delivery
        silently stopped.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        async with contextlib.AsyncExitStack() as stack:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                stack.callback(loop.remove_signal_handler, sig)
            stack.callback(self.notifier.close)
            try:
                stack.callback(os.close, recovery.lock_spool(self.cfg.spool_dir))
            except OSError as exc:
                log.error("cannot start: %s", exc)
                return 1
            self.recover()
            stack.callback(self.ledger.close)
            self.gate.check()  # logs "capture Stopped" already if the disk is past the watermark
            await self.delivery.open()
            stack.push_async_callback(self.delivery.close)
            ing = self.cfg.ingest
            try:
                sock, self.inherited_socket = listen.listening_socket(
                    self.inherited, self.cfg.socket_path, ing.socket_mode, ing.socket_group
                )
            except (OSError, LookupError) as exc:
                log.error("cannot listen on %s: %s", self.cfg.socket_path, exc)
                return 1
            await self.ingest.start(sock=sock)
            stack.callback(self._stop_listening)
            if self.metrics is not None:
                try:
                    await self.metrics.start()
                except (OSError, ValueError) as exc:
                    log.error("cannot serve metrics on %s: %s", self.metrics.address, exc)
                    return 1
                stack.push_async_callback(self.metrics.stop)
            for e in self.status().endpoints:
                log.info(
                    "capturing for endpoint %s: files land in %s (sampling %d%%%s, capture %s)",
                    e.endpoint_name,
                    e.destination_s3_uri,
                    e.current_sampling_percentage,
                    " by inference id" if e.sampling_mode == INFERENCE_ID else "",
                    e.capture_status,
                )
            log.info("socket %s, spool %s", self.cfg.socket_path, self.cfg.spool_dir)
            log.info(
                "clients: CaptureClient(%r), or CaptureClient() with %s=%s in their environment",
                self.cfg.socket_path,
                SOCKET_ENV,
                self.cfg.socket_path,
            )
            self.notifier.ready(self.status_line())
            self.ready.set()
            async with asyncio.TaskGroup() as tasks:
                ticker = tasks.create_task(self._tick(), name="tick")
                prefixes = [f"{ep.endpoint_name}/" for ep in self.cfg.endpoint_configs]
                delivery = tasks.create_task(self.delivery.run(prefixes), name="delivery")
                await self._stop.wait()
                await self._shut_down()
                ticker.cancel()
                delivery.cancel()  # what could not be delivered in time stays in the spool
        c = self.pipeline.counters
        log.info(
            "stopped: received %d, written %d, dropped %s, resent %d",
            c.received,
            c.written,
            c.dropped,
            c.resent,
        )
        return 0

    def _stop_listening(self) -> None:
        self.ingest.stop_accepting()
        if not self.inherited_socket:  # systemd's socket stays, queueing clients for the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.socket_path)

    async def _shut_down(self) -> None:
        """The order that loses nothing: clients drained, files sealed and flushed, delivered."""
        log.info("shutting down: draining clients (up to %.0f s)", self.cfg.ingest.drain_timeout_s)
        self.notifier.stopping()
        self._stop_listening()
        await self.ingest.drain(self.cfg.ingest.drain_timeout_s)
        self.spool.seal_all()
        self.ledger.commit()
        await self.spool.syncer.wait()  # flushed, renamed, and handed to delivery
        waiting = len(self.delivery.waiting_paths())
        timeout = self.cfg.s3.shutdown_timeout_s
        if waiting:
            log.info(
                "shutting down: delivering %d sealed file(s) for up to %.0f s (s3.shutdown_timeout_s),"
                " then what is left stays in the spool for the next start%s",
                waiting,
                timeout,
                "; a second Ctrl-C stops now" if self._last_signal == signal.SIGINT else "",
            )
        if not await self.delivery.drain(timeout):
            st = self.delivery.statistics()
            log.warning(
                "shutdown: files left in the spool for the next start: %d (%d bytes); failures %s",
                st.files_waiting,
                st.bytes_waiting,
                st.failures or "none",
            )

    async def _tick(self) -> None:
        """The daemon's heartbeat, on the event loop: if the loop is stuck, no WATCHDOG=1 goes
        out and systemd restarts the service."""
        loop = asyncio.get_running_loop()
        next_ping = next_status = loop.time()
        last_received, last_at = self.pipeline.counters.received, loop.time()
        while True:
            await asyncio.sleep(TICK_S)
            self.gate.tick()
            self.ingest.sweep()
            try:
                self.spool.tick()
            except OSError as exc:
                log.error("spool rotation failed: %s", exc)
            if self.ledger.commit():  # retries an entry that could not be written before
                self.ledger.compact_if_large(self.spool.committed_ends())
            now = loop.time()
            if self.watchdog_s is not None and now >= next_ping:
                self.notifier.send(WATCHDOG=1)
                next_ping = now + self.watchdog_s / 3
            if self.notifier.enabled and now >= next_status:
                received = self.pipeline.counters.received
                rate = (received - last_received) / max(now - last_at, 1e-9)
                last_received, last_at = received, now
                self.notifier.send(STATUS=self.status_line(rate))
                next_status = now + STATUS_EVERY_S

    def status_line(self, records_per_s: float = 0.0) -> str:
        """One line for `systemctl status`: capture state, sampling, rate, files waiting."""
        routes = list(self.pipeline.routes.values())
        waiting = len(self.delivery.waiting_paths())
        rate = f"{records_per_s:.0f} records/s"
        if len(routes) == 1:
            route = routes[0]
            if route.enabled and self.gate.open:
                state = "capture Started"
            else:
                state = (
                    f"capture Stopped ({'EnableCapture is false' if not route.enabled else self.gate.reason})"
                )
            return f"{state}, sampling {route.percentage}%, {rate}, {waiting} files waiting"
        started = sum(r.enabled for r in routes) if self.gate.open else 0
        state = f"capture Started for {started} of {len(routes)} endpoints"
        if not self.gate.open:
            state += f" ({self.gate.reason})"
        return f"{state}, {rate}, {waiting} files waiting"

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change live.

        Endpoints may be added and removed; of an endpoint that stays, sampling (percentage and
        mode), EnableCapture, capture options and content types change; so may the watermark
        and `default_endpoint`. All take effect for the next batch; batches
        are processed whole on this loop, so no record is lost or counted twice around the
        switch and no connection is dropped. A removed endpoint's open files are sealed and
        delivered where its configuration said; captures naming it are refused from then on
        (`unknown_endpoint`). Any other change (socket, spool, an endpoint's destination, KMS key
        or default variant, limits, compression) refuses the whole reload, as does an invalid
        file: the running configuration stays.
        """
        self.notifier.reloading()
        try:
            if self._reload is None:
                log.warning("SIGHUP: no configuration source to read again; nothing changed")
                return
            try:
                new = self._reload()
            except Exception as exc:  # ConfigError: its problems were logged one per line
                log.error("reload refused, the running configuration stays: %s", exc)
                return
            self._apply(new)
        finally:
            self.notifier.ready(self.status_line())

    def _apply(self, new: Config) -> None:
        changes, fixed = reload_changes(self.cfg, new)
        if fixed:
            log.error(
                "reload refused, the running configuration stays: %s cannot change without a restart",
                ", ".join(fixed),
            )
            return
        if not changes:
            log.info("reload: the configuration is unchanged")
            return
        old_names = {ep.endpoint_name for ep in self.cfg.endpoint_configs}
        try:  # new destinations first: one that cannot work refuses the reload before any change
            for ep in new.endpoint_configs:
                if ep.endpoint_name not in old_names:
                    self.router.route(
                        ep.endpoint_name, ep.DataCaptureConfig.DestinationS3Uri, ep.DataCaptureConfig.KmsKeyId
                    )
        except OSError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        for name in self.pipeline.reconfigure(new):
            self.spool.seal_all(name)  # its files are delivered where its configuration said
        self.gate.cfg = new.watermark
        self.cfg = new
        log.info("reload: applied %s", "; ".join(changes))

    def stop(self) -> None:
        """Begin the orderly shutdown, as SIGTERM does."""
        self._stop.set()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        self._last_signal = sig
        if self._signals > 1 and sig == signal.SIGINT:
            log.warning("second SIGINT: exiting at once; the spool is recovered at the next start")
            os._exit(130)
        self._stop.set()


def make_delivery(
    cfg: Config,
    clock: Clock,
    *,
    on_compressed: Callable[[CompressResult], None] = lambda result: None,
    estimate: Callable[[], float] = lambda: 1.0,
) -> tuple[Delivery, Router, Compressing | None]:
    """The delivery stage: every endpoint's files to its destination (S3, or a local directory),
    through zstd first when `delivery.compression` says so."""
    router = Router(cfg.s3)
    for ep in cfg.endpoint_configs:
        router.route(ep.endpoint_name, ep.DataCaptureConfig.DestinationS3Uri, ep.DataCaptureConfig.KmsKeyId)
    compressing = None
    destination: Destination = router
    if cfg.delivery.compression == "zstd":
        compressing = Compressing(router, cfg.delivery.compression_level, on_compressed, estimate)
        destination = compressing
    delivery = Delivery(
        destination,
        workers=cfg.s3.max_concurrent_uploads if router.has_s3 else 1,
        fatal_retry_s=cfg.s3.fatal_retry_s,
        wall=clock.wall,
        monotonic=clock.monotonic,
    )
    return delivery, router, compressing


def reload_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """What a reload from `old` to `new` changes, in words, and what it may not change.

    Endpoints are compared by name: added and removed ones are changes; of an endpoint in both,
    every setting is live but its destination and KMS key (`FIXED_ENDPOINT_SETTINGS`).
    """
    changed = [k for k in config_differences(old, new) if not k.startswith(ENDPOINT_KEYS)]
    fixed = [k for k in changed if not k.startswith(LIVE_SETTINGS)]
    changes = list(changed)
    if old.default_endpoint_name != new.default_endpoint_name:
        changes.append(f"default endpoint {new.default_endpoint_name or 'none'}")
    before = {ep.endpoint_name: ep for ep in old.endpoint_configs}
    after = {ep.endpoint_name: ep for ep in new.endpoint_configs}
    for name, ep in after.items():
        if name not in before:
            changes.append(f"endpoint {name} added")
            continue
        diffs = config_differences(before[name], ep)
        fixed += [f"endpoint {name}: {k}" for k in diffs if k in FIXED_ENDPOINT_SETTINGS]
        changes += [f"endpoint {name}: {k}" for k in diffs]
    changes += [f"endpoint {name} removed" for name in before if name not in after]
    return changes, fixed


def config_differences(old: msgspec.Struct, new: msgspec.Struct, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ (tables compared key by key)."""
    out: list[str] = []
    for name in old.__struct_fields__:
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        key = f"{prefix}{name}"
        if (
            isinstance(a, msgspec.Struct)
            and isinstance(b, msgspec.Struct)
            and type(a) is type(b)
            and name != "CaptureContentTypeHeader"
        ):
            out += config_differences(a, b, key + ".")
        else:
            out.append(key)
    return out


def serve(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    import uvloop

    need = cfg.ingest.max_connections + cfg.spool.max_open_files + 256  # clients, spool files, the rest
    if (limit := raise_open_files_limit(need)) < need:
        log.warning(
            "open files limit %d is below the %d that ingest.max_connections = %d may need",
            limit,
            need,
            cfg.ingest.max_connections,
        )

    if not tune_malloc():
        log.debug("mallopt not available; running with the C library's default allocator settings")

    async def main() -> int:
        try:
            daemon = Daemon(cfg, reload)
        except OSError as exc:  # unwritable spool or destination, ...: say so, no traceback
            log.error("cannot start: %s", exc)
            return 1
        try:
            return await daemon.run()
        except Exception:  # a bug: say it loudly and exit non-zero, and systemd restarts us
            log.critical(
                "the daemon failed and stops; the spool is recovered at the next start", exc_info=True
            )
            return EXIT_FAILED

    return uvloop.run(main())
