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
import ctypes
import errno
import fcntl
import grp
import logging
import os
import resource
import signal
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from captured import __version__
from captured.daemon.ingest import IngestServer
from captured.daemon.ledger import Ledger
from captured.daemon.pipeline import Pipeline
from captured.daemon.spool import PART, SEALED, Spool, ThreadSyncer, object_key, recover_part
from captured.daemon.watermark import CaptureGate
from captured.delivery.queue import Delivery, LocalDestination, scan_spool
from captured.delivery.uploader import S3Uploader
from captured.service import systemd
from captured.service.config import Config

if TYPE_CHECKING:
    from captured.service.metrics import MetricsServer

log = logging.getLogger("captured.daemon")

TICK_S = 0.25
#: sun_path holds 108 bytes, the last a NUL.
MAX_SOCKET_PATH = 107


#: How often the one-line STATUS= for systemd is refreshed.
STATUS_EVERY_S = 5.0

#: Settings a reload may change; any other difference refuses the whole reload.
LIVE_SETTINGS = (
    "DataCaptureConfig.EnableCapture",
    "DataCaptureConfig.InitialSamplingPercentage",
    "DataCaptureConfig.CaptureOptions",
    "DataCaptureConfig.CaptureContentTypeHeader",
    "watermark",
)


class Daemon:
    def __init__(self, cfg: Config, reload: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self._reload = reload
        # Read (and removed from the environment) before any child process starts.
        self.notifier = systemd.Notifier()
        self.watchdog_s = systemd.watchdog_interval()
        self.inherited = systemd.listen_fds()
        self.started_at = time.time()
        self.delivery = make_delivery(cfg)
        self.ledger = Ledger(cfg.spool_dir)
        self.spool = Spool(
            cfg.spool_dir,
            cfg.endpoint_name,
            cfg.spool,
            self.delivery.submit,
            syncer=ThreadSyncer(asyncio.get_running_loop()),
            ledger=self.ledger,
        )
        self.gate = CaptureGate(cfg.spool_dir, cfg.watermark)
        self.pipeline = Pipeline(cfg, self.spool, self.gate)
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
        self._cleanup: asyncio.Task[None] | None = None
        self._signals = 0

    def status(self) -> dict[str, Any]:
        """What SageMaker's DescribeEndpoint shows for capture, and what happened so far."""
        dcc = self.cfg.DataCaptureConfig
        enabled = dcc.EnableCapture
        capturing = enabled and self.gate.open
        doc: dict[str, Any] = {
            "EndpointName": self.cfg.endpoint_name,
            "VariantName": self.cfg.variant_name,
            "EnableCapture": enabled,
            "CaptureStatus": "Started" if capturing else "Stopped",
            "CaptureStatusReason": None
            if capturing
            else ("EnableCapture is false" if not enabled else self.gate.reason),
            "CurrentSamplingPercentage": self.pipeline.percentage,
            "DestinationS3Uri": dcc.DestinationS3Uri,
            "KmsKeyId": dcc.KmsKeyId,
            "counters": self.pipeline.counters.as_dict(),
            "spool": {
                "dir": self.cfg.spool_dir,
                "open_files": self.spool.open_files,
                "files_sealed": self.spool.files_sealed,
                "bytes_written": self.spool.bytes_written,
                "sealed_for_room": self.spool.sealed_for_room,
            },
            "watermark": self.gate.status(),
            "delivery": self.delivery.stats(),
            "ingest": self.ingest.stats.as_dict(),
            "sessions": {
                "remembered": len(self.ledger.sessions),
                "journal_bytes": self.ledger.size,
                "journal_ok": not self.ledger.failed,
            },
            "socket_path": self.cfg.socket_path,
            "metrics": self.metrics.bound if self.metrics is not None else None,
            "uptime_s": round(time.time() - self.started_at, 3),
            "version": __version__,
            "pid": os.getpid(),
        }
        return doc

    def recover(self) -> None:
        """Seal `.part` files a crashed run left (whole lines only) and queue sealed files.

        A file the journal names is first cut to its committed end (`ledger`): what lies past it
        was never acknowledged, and its client sends it again. Every file is then cut back to its
        last complete line: after a power loss, the end of a file written since the last flush
        may be missing. The sessions the journal remembers go into a fresh journal.
        """
        committed = self.ledger.load()
        found, parts = scan_spool(self.cfg.spool_dir, self.cfg.endpoint_name)
        sealed = []
        for path in [p for p, _ in found] + parts:
            size = os.lstat(path).st_size
            kept = recover_part(path, committed.get(_stem(path)))
            if kept != size:
                log.warning("cut %s from %d to %d bytes (its end was torn or uncommitted)", path, size, kept)
            if kept == 0:
                os.unlink(path)
                continue
            if path.endswith(PART):
                target = path[: -len(PART)]
                os.rename(path, target)
                log.info("recovered %s (%d bytes of whole lines)", target, kept)
                path = target
            sealed.append((path, kept))
        self.ledger.open()
        for path, size in sealed:
            self.delivery.submit(path, size, recovered=True)
        if sealed:
            log.info("%d sealed file(s) from an earlier run queued for delivery", len(sealed))
        if self.ledger.sessions:
            log.info("journal: %d client session(s) remembered", len(self.ledger.sessions))

    async def start_delivery(self) -> None:
        """Open the destination and start delivering; look for uploads left open meanwhile.

        A file an earlier run left in the spool aborts its own key's open uploads before its
        first attempt (`recovered`); what no spool file explains is looked for in the background,
        so a stalled S3 never holds up start-up.
        """
        dest = self.delivery.destination
        await dest.start()
        self.delivery.start()
        if isinstance(dest, S3Uploader):
            self._cleanup = asyncio.get_running_loop().create_task(
                self._abort_unknown_uploads(dest), name="abort-unknown-uploads"
            )

    async def _stop_delivery(self) -> None:
        if self._cleanup is not None:
            self._cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cleanup
        await self.delivery.stop()

    async def _abort_unknown_uploads(self, dest: S3Uploader) -> None:
        own_prefix = f"{self.cfg.endpoint_name}/"
        try:
            async with asyncio.timeout(120):
                stale = await dest.list_stale(own_prefix, self.cfg.s3.abort_unknown_uploads_after_s)
                # Listed after they were: a file of this run whose upload is open is still waiting
                # here, and one delivered since has no open upload left to abort.
                explained = {object_key(p) for p in self.delivery.waiting_paths()}
                unknown = [(key, upload_id) for key, upload_id in stale if key not in explained]
                aborted = await dest.abort_uploads(unknown) if unknown else 0
        except Exception as exc:  # S3 unreachable now: the next start looks again
            log.warning("could not look for multipart uploads left open under %s: %s", own_prefix, exc)
            return
        if aborted:
            log.info(
                "aborted %d multipart upload(s) under %s left open by an earlier run, that no spool"
                " file explains",
                aborted,
                own_prefix,
            )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            self._lock = lock_spool(self.cfg.spool_dir)
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        self.recover()
        self.gate.check()  # logs "capture Stopped" already if the disk is past the watermark
        await self.start_delivery()
        try:
            sock = self._listening_socket()
        except (OSError, LookupError) as exc:
            log.error("cannot listen on %s: %s", self.cfg.socket_path, exc)
            await self._stop_delivery()
            return 1
        await self.ingest.start(sock=sock)
        if self.metrics is not None:
            try:
                await self.metrics.start()
            except (OSError, ValueError) as exc:
                log.error("cannot serve metrics on %s: %s", self.metrics.address, exc)
                self.ingest.stop_accepting()
                await self._stop_delivery()
                return 1
        log.info(
            "capturing for endpoint %s: socket %s, spool %s, files land in %s (sampling %d%%, capture %s)",
            self.cfg.endpoint_name,
            self.cfg.socket_path,
            self.cfg.spool_dir,
            self.cfg.DataCaptureConfig.DestinationS3Uri,
            self.pipeline.percentage,
            "Started" if self.pipeline.enabled and self.gate.open else "Stopped",
        )
        self.notifier.ready(self.status_line())
        ticker = loop.create_task(self._tick(), name="tick")
        await self._stop.wait()
        log.info("shutting down: draining clients")
        self.notifier.stopping()
        self.ingest.stop_accepting()
        if not self.inherited:  # systemd's socket stays, queueing clients for the next start
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.socket_path)
        await self.ingest.drain(self.cfg.ingest.drain_timeout_s)
        ticker.cancel()
        if self.metrics is not None:
            await self.metrics.stop()
        self.spool.seal_all()
        self.ledger.commit()
        await self.spool.syncer.wait()  # flushed, renamed, and handed to delivery
        if not await self.delivery.drain(self.cfg.s3.shutdown_timeout_s):
            log.warning("shutdown: files left in the spool for the next start: %s", self.delivery.stats())
        await self._stop_delivery()
        c = self.pipeline.counters
        log.info(
            "stopped: received %d, written %d, dropped %s, resent %d",
            c.received,
            c.written,
            c.dropped,
            c.resent,
        )
        self.ledger.close()
        self.notifier.close()
        return 0

    def _listening_socket(self) -> socket.socket:
        """The socket systemd passed (socket activation), else our own at `socket_path`."""
        for sock in self.inherited:
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                sock.setblocking(False)
                name = sock.getsockname()
                if name != self.cfg.socket_path:
                    log.warning(
                        "the socket systemd passed is %r, not socket_path %s (which `captured status` uses)",
                        name,
                        self.cfg.socket_path,
                    )
                log.info("listening on the socket systemd passed: %s", name)
                return sock
        if self.inherited:
            log.warning(
                "systemd passed %d socket(s), none a Unix stream socket: binding our own", len(self.inherited)
            )
            self.inherited = []
        return bind_socket(self.cfg.socket_path, self.cfg.ingest.socket_mode, self.cfg.ingest.socket_group)

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
        enabled = self.pipeline.enabled
        if enabled and self.gate.open:
            state = "capture Started"
        else:
            state = f"capture Stopped ({'EnableCapture is false' if not enabled else self.gate.reason})"
        waiting = len(self.delivery.waiting_paths())
        rate = f"{records_per_s:.0f} records/s"
        return f"{state}, sampling {self.pipeline.percentage}%, {rate}, {waiting} files waiting"

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can change live.

        Sampling, EnableCapture, capture options, content types and the watermark take effect
        for the next batch; batches are processed whole on this loop, so no record is lost or
        counted twice around the switch and no connection is dropped. Any other change (socket,
        spool, destination, KMS key, limits) refuses the whole reload, as does an invalid file:
        the running configuration stays.
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
        changed = config_differences(self.cfg, new)
        fixed = [k for k in changed if not k.startswith(LIVE_SETTINGS)]
        if fixed:
            log.error(
                "reload refused, the running configuration stays: %s cannot change without a restart",
                ", ".join(fixed),
            )
            return
        if not changed:
            log.info("reload: the configuration is unchanged")
            return
        dcc = new.DataCaptureConfig
        self.pipeline.reconfigure(dcc)
        self.gate.cfg = new.watermark
        self.cfg = new
        log.warning(
            "reload: applied %s (sampling %d%%, capture %s)",
            ", ".join(changed),
            dcc.InitialSamplingPercentage,
            "enabled" if dcc.EnableCapture else "disabled",
        )

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1 and sig == signal.SIGINT:
            log.warning("second SIGINT: exiting at once; the spool is recovered at the next start")
            os._exit(130)
        self._stop.set()


def _stem(path: str) -> str:
    """A spool file's name without `.jsonl` / `.jsonl.part`: its name in the journal."""
    name = os.path.basename(path)
    return name.split(SEALED, 1)[0]


def lock_spool(spool_dir: str) -> int:
    """Hold an exclusive lock on the spool for the daemon's life (released when it exits).

    Recovery renames `.part` files: a second daemon on the same spool would seal a live
    daemon's open files under it. The lock makes the second one refuse to start instead.
    """
    path = os.path.join(spool_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link; refusing to use it (remove it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file; refusing to use it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(f"another daemon is using the spool {spool_dir}") from None
    return fd


def make_delivery(cfg: Config) -> Delivery:
    """The delivery stage for the configured destination: S3, or a local directory."""
    uri = cfg.DataCaptureConfig.DestinationS3Uri
    if uri.startswith("s3://"):
        dest = S3Uploader(uri, cfg.s3, kms_key_id=cfg.DataCaptureConfig.KmsKeyId)
        return Delivery(dest, workers=cfg.s3.max_concurrent_uploads, fatal_retry_s=cfg.s3.fatal_retry_s)
    return Delivery(LocalDestination(uri))


def bind_socket(path: str, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Bind the capture socket, replacing a stale socket file but never a live daemon's.

    The socket is bound under a temporary name beside `path`, given its mode and group, and
    renamed into place: no client ever sees it with other permissions.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    gid = -1 if group is None else _group_id(group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(path)  # stale: nobody listens
        else:
            raise FileExistsError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    tmp = os.path.join(os.path.dirname(path), f".captured-{os.getpid()}.sock")
    if len(os.fsencode(tmp)) > MAX_SOCKET_PATH:  # no room for a longer name: bind in place
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        try:
            os.chmod(tmp, mode)
            if gid != -1:
                os.chown(tmp, -1, gid)
            if tmp != path:
                os.rename(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LookupError(f"ingest.socket_group: no group named {group!r}") from None


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep glibc from returning and re-faulting the same memory for every batch.

    Each batch allocates and frees buffers of a few hundred KiB. By default glibc serves those
    with mmap/munmap (above 128 KiB) and trims the heap top after each free, so the next batch
    page-faults the same memory back in: measured, a third of the daemon's CPU went to the kernel
    (bench/README.md). Serving them from the heap and trimming only past 64 MiB of free space
    removes those faults; RSS stays bounded by the largest burst, not by time. A no-op where the
    C library has no `mallopt` (musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok: bool = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024) == 1 and ok
    return ok


def raise_open_files_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward `want` (at most the hard limit); return the new soft
    limit. systemd starts services at 1024 soft, fewer than `ingest.max_connections` plus the
    spool's files need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def config_differences(old: Config, new: Config, prefix: str = "") -> list[str]:
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
            out += config_differences(a, b, key + ".")  # type: ignore[arg-type]
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
        return await daemon.run()

    return uvloop.run(main())
