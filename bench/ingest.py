"""End-to-end ingest benchmark: `captured` against a naive asyncio baseline on the same machine.

For each system: start the server as a subprocess on a fresh temporary directory, start the
sender processes, release them together, and stop the clock when the server's own counters show
every record processed. Then stop the server (SIGTERM) and count the lines it left on disk.

    python bench/ingest.py                      # 1,000,000 records, 2 senders, both systems
    python bench/ingest.py -n 200000 --payload 8k --sampling 10 --repeat 3 --json
    python bench/ingest.py --only captured --profile /tmp/prof   # py-spy on the daemon
    python bench/ingest.py --only captured --s3  # also captured delivering to a local S3 server

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil
import pyspy
import zstandard
from senders import run_sender
from servers import (
    MAX_FILE_AGE_S,
    SYSTEMS,
    CapturedEndpointsServer,
    CapturedS3Server,
    CapturedServer,
    CapturedZstdServer,
    Server,
)

from captured.delivery.compress import compress_file
from captured.testing.data import PAYLOAD_SIZES, body_bytes, payloads
from captured.testing.s3 import MotoServer
from captured.testing.s3sink import SinkServer

POLL_S = 0.02
FLUSH_TIMEOUT_S = 120.0
MB = 1_000_000
#: Bytes a capture line adds to its request body (JSON keys, response, metadata), roughly.
PREWARM_LINE_OVERHEAD = 400
#: Metrics whose median is reported when `--repeat` > 1.
METRICS = ("wall_s", "records_per_s", "mb_per_s", "daemon_cpu_s", "daemon_user_s", "daemon_sys_s",
           "cpu_s_per_m", "daemon_minor_faults", "peak_rss_mb", "sender_cpu_s", "sender_retries",
           "s3_server_cpu_s", "uploader_cpu_s", "uploader_peak_rss_mb")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="captured vs a naive baseline: end-to-end ingest")
    p.add_argument("-n", "--records", type=int, default=1_000_000, help="records in total (default 1000000)")
    p.add_argument("--senders", type=int, default=2, help="sender processes (default 2)")
    p.add_argument("--sampling", type=int, default=100, help="sampling percentage, 0..100 (default 100)")
    p.add_argument("--payload", choices=sorted(PAYLOAD_SIZES), default="250", help="request body size")
    p.add_argument("--only", choices=["captured", "naive", "both"], default="both")
    p.add_argument(
        "--s3",
        action="store_true",
        help="also run captured with S3 delivery to a local S3-compatible server (system captured-s3)",
    )
    p.add_argument(
        "--s3-server",
        choices=["moto", "sink"],
        default="moto",
        help="with --s3: the local S3-compatible server: moto (default; faithful, about 8 CPU s per "
        "GB it stores) or sink (captured/testing/s3sink.py: objects in memory, aiohttp, CRC32 "
        "checked, about 3 CPU s per GB)",
    )
    p.add_argument(
        "--s3-server-priority",
        choices=["idle", "normal"],
        default="normal",
        help="CPU priority of the local S3 server: normal (default) lets it compete with the daemon "
        "and the senders for this machine's cores; idle gives it only CPU time nobody else wants, "
        "closer to a remote S3 but slower to take the uploads",
    )
    p.add_argument(
        "--uploader-nice",
        type=int,
        choices=range(20),
        metavar="0..19",
        help="with --s3: the daemon's [s3] uploader_nice (default: the daemon's default)",
    )
    p.add_argument(
        "--sender",
        choices=["client", "frames"],
        default="client",
        help="how captured's senders send: client (CaptureClient.capture per record, the default) or "
        "frames (the same BATCH frames built before the clock and written raw: the daemon's intake alone)",
    )
    p.add_argument(
        "--spool-fsync",
        type=float,
        metavar="S",
        help="captured's [spool] fsync_interval_s (default: the daemon's default, 1 s; 0: only at seal)",
    )
    p.add_argument(
        "--idle-load",
        action="store_true",
        help="also run captured with a file destination beside a SCHED_IDLE busy loop "
        "(system captured-idle-load), the control for the S3 case",
    )
    p.add_argument(
        "--endpoints",
        type=int,
        default=1,
        metavar="N",
        help="also run captured serving N endpoints (system captured-endpoints), sender i naming endpoint "
        "i mod N; compare at --senders >= N (each model server names its own endpoint)",
    )
    p.add_argument(
        "--compression",
        choices=["none", "zstd"],
        default="none",
        help="zstd: also run captured delivering .jsonl.zst objects (system captured-zstd), and report "
        "what compressing cost (CPU s per GB, ratio; measured once every file is delivered)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--repeat", type=int, default=1, help="runs per system; the median is reported")
    p.add_argument("--workdir", help="where spool and output files go (default: a directory under /tmp)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take before it fails")
    p.add_argument(
        "--no-prewarm",
        dest="prewarm",
        action="store_false",
        help="skip writing (and deleting) a scratch file of the output's size before each run",
    )
    p.add_argument(
        "--server-env",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="extra environment for both servers (an experiment knob, e.g. malloc tuning)",
    )
    p.add_argument("--profile", metavar="DIR", help="record each server with py-spy into DIR")
    p.add_argument("--profile-format", choices=["raw", "flamegraph", "speedscope"], default="raw")
    args = p.parse_args(argv)
    if any("=" not in kv for kv in args.server_env):
        p.error("--server-env takes KEY=VALUE")
    if args.records < 1 or args.senders < 1 or args.repeat < 1 or not 0 <= args.sampling <= 100:
        p.error("--records, --senders and --repeat must be positive; --sampling 0..100")
    if not 1 <= args.endpoints <= 64:
        p.error("--endpoints must be 1..64")
    return args


def shares(total: int, parts: int) -> list[int]:
    """Split `total` records over `parts` senders as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def set_idle_priority(pid: int) -> None:
    """SCHED_IDLE for every thread of `pid` (threads it starts later inherit it from theirs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU seconds of `proc`, all its threads included."""
    t = proc.cpu_times()
    return float(t.user), float(t.system)


class SenderPool:
    """Sender processes released together by one event; results come back on one queue."""

    def __init__(
        self,
        system: str,
        socket_path: str,
        counts: list[int],
        size: int,
        sender: str = "client",
        endpoints: Sequence[str | None] = (None,),
    ) -> None:
        ctx = mp.get_context("spawn")
        self.queue: Any = ctx.Queue()
        self.go = ctx.Event()
        self.results: list[dict[str, Any]] = []
        self.procs = [
            ctx.Process(
                target=run_sender,
                args=(system, i, socket_path, n, size, self.queue, self.go, FLUSH_TIMEOUT_S),
                kwargs={"sender": sender, "endpoint_name": endpoints[i % len(endpoints)]},
                daemon=True,
            )
            for i, n in enumerate(counts)
        ]

    def start(self, timeout_s: float = 120.0) -> None:
        for p in self.procs:
            p.start()
        for _ in self.procs:
            self._take(self.queue.get(timeout=timeout_s))

    def poll(self) -> None:
        """Collect finished senders' results; raise if a sender failed or died."""
        while True:
            try:
                self._take(self.queue.get_nowait())
            except queue.Empty:
                break
        for p in self.procs:
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"sender {p.name} died with exit code {p.exitcode}")

    def finish(self, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(self.results) < len(self.procs):
            self.poll()
            if time.monotonic() > deadline:
                raise TimeoutError("senders did not report in time")
            time.sleep(POLL_S)
        for p in self.procs:
            p.join(10)
        return sorted(self.results, key=lambda r: int(r["sender"]))

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)

    def _take(self, msg: Any) -> None:
        if isinstance(msg, dict):
            if msg.get("error"):
                raise RuntimeError(f"sender {msg['sender']} failed: {msg['error']}")
            self.results.append(msg)


def wait_processed(
    server: Server, pool: SenderPool, total: int, timeout_s: float
) -> tuple[int, int, dict[str, int]]:
    """Poll the server until it has taken all `total` records and settled each one."""
    deadline = time.monotonic() + timeout_s
    while True:
        received, written, dropped = server.counts()
        if received >= total and written + sum(dropped.values()) >= received:
            return received, written, dropped
        if not server.alive():
            raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")
        pool.poll()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{server.name}: {received}/{total} received, {written} written after {timeout_s} s"
            )
        time.sleep(POLL_S)


def run_once(system: str, args: argparse.Namespace, run: int) -> dict[str, Any]:
    size = PAYLOAD_SIZES[args.payload]
    counts = shares(args.records, args.senders)
    body = sum(body_bytes(payloads(n, seed=i, size=size)) for i, n in enumerate(counts))
    env = dict(kv.split("=", 1) for kv in args.server_env)
    server = SYSTEMS[system](args.sampling, args.workdir, env)
    pool: SenderPool | None = None
    recorder: pyspy.Recorder | None = None
    try:
        if args.prewarm:
            server.prewarm(args.records * (size + PREWARM_LINE_OVERHEAD))
        server.start()
        endpoints = server.endpoint_names() if isinstance(server, CapturedServer) else [None]
        pool = SenderPool(system, server.socket_path, counts, size, args.sender, endpoints)
        pool.start()
        daemon = psutil.Process(server.pid)
        if args.profile:
            ext = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[args.profile_format]
            out = os.path.join(args.profile, f"{system}-{run}.{ext}")
            recorder = pyspy.Recorder(server.pid, out, args.profile_format)
            recorder.start()
            time.sleep(1.0)  # let py-spy attach before the clock starts
        helper = psutil.Process(CapturedS3Server.moto.proc.pid) if system == "captured-s3" else None
        children = daemon.children()  # captured's S3 uploader process
        cpu0, faults0 = cpu_seconds(daemon), server.minor_faults()
        helper0 = sum(cpu_seconds(helper)) if helper else 0.0
        children0 = sum(sum(cpu_seconds(c)) for c in children)
        t0 = time.perf_counter()
        pool.go.set()
        received, written, dropped = wait_processed(server, pool, args.records, args.timeout)
        wall = time.perf_counter() - t0
        cpu1, faults = cpu_seconds(daemon), server.minor_faults() - faults0
        helper_cpu = sum(cpu_seconds(helper)) - helper0 if helper else 0.0
        children_cpu = sum(sum(cpu_seconds(c)) for c in children) - children0
        at_stop = server.snapshot()
        if recorder is not None:
            recorder.stop()
        senders = pool.finish(args.timeout)
        peak_rss = server.peak_rss_bytes()
        children_rss = sum(peak_rss_bytes(c.pid) for c in children)
        rc = server.stop()
        lines, files = server.count_lines()
        compression = measure_compression(server) if isinstance(server, CapturedZstdServer) else None
    finally:
        if recorder is not None:
            recorder.stop()
        if pool is not None:
            pool.kill()
        server.cleanup()
    daemon_cpu = sum(cpu1) - sum(cpu0)
    expected = args.records if args.sampling == 100 else written
    ok = rc == 0 and received == args.records and written == expected and lines == written
    ok = ok and all(s.get("flushed", True) for s in senders)
    result: dict[str, Any] = {
        "system": system,
        "records": args.records,
        "received": received,
        "written": written,
        "dropped": dropped,
        "wall_s": wall,
        "records_per_s": args.records / wall,
        "mb_per_s": body / wall / MB,
        "body_bytes": body,
        "daemon_cpu_s": daemon_cpu,
        "daemon_user_s": cpu1[0] - cpu0[0],
        "daemon_sys_s": cpu1[1] - cpu0[1],
        "cpu_s_per_m": daemon_cpu / args.records * 1e6,
        "daemon_minor_faults": faults,
        "peak_rss_mb": peak_rss / MB,
        "sender_cpu_s": sum(float(s["cpu_s"]) for s in senders),
        "sender_retries": sum(int(s["retries"]) for s in senders),
        "s3_server_cpu_s": helper_cpu,
        "uploader_cpu_s": children_cpu,
        "uploader_peak_rss_mb": children_rss / MB,
        "at_clock_stop": at_stop,
        "senders": senders,
        "exit_code": rc,
        "output_files": files,
        "lines_verified": lines,
        "ok": ok,
    }
    if compression is not None:
        # The daemon compresses on a worker thread; what it spent before the clock stopped (files
        # sealed during the run) is in daemon_cpu_s: shown apart, so ingest compares like for like.
        in_window = float(at_stop.get("compression_cpu_s", 0.0))
        compression["in_window_cpu_s"] = in_window
        result["cpu_s_per_m_without_compression"] = (daemon_cpu - in_window) / args.records * 1e6
        result["compression"] = compression
    if recorder is not None:
        result["profile"] = recorder.out_path
        if args.profile_format == "raw":
            result["profile_summary"] = pyspy.summarize(recorder.out_path)[1]
    return result


def measure_compression(server: CapturedServer) -> dict[str, Any]:
    """What compressing the run's captures costs, measured on the daemon's own output: each
    delivered `.jsonl.zst` decompressed to a scratch file and compressed again by the call the
    daemon makes (`compress_file`, same level), timed by the thread's CPU clock."""
    plain = compressed = 0
    cpu = 0.0
    for dirpath, _, names in os.walk(server.out_dir):
        for name in names:
            if not name.endswith(".jsonl.zst"):
                continue
            src = os.path.join(dirpath, name)
            scratch = os.path.join(server.data_dir, "measure.jsonl")
            with open(src, "rb") as fin, open(scratch, "wb") as fout:
                zstandard.ZstdDecompressor().copy_stream(fin, fout)
            result = compress_file(scratch, scratch + ".zst", server.compression_level)
            os.unlink(scratch)
            os.unlink(scratch + ".zst")
            plain += result.plain_bytes
            compressed += result.compressed_bytes
            cpu += result.cpu_s
    return {
        "level": server.compression_level,
        "plain_bytes": plain,
        "compressed_bytes": compressed,
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (plain / 1e9) if plain else float("nan"),
        "ratio": plain / compressed if compressed else float("nan"),
    }


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each metric in `METRICS`; counts (written, lines, files) are the first run's.

    `ok` is true only when every run verified its output.
    """
    out = dict(runs[0])
    for key in METRICS:
        out[key] = statistics.median(float(r[key]) for r in runs)
    out["ok"] = all(r["ok"] for r in runs)
    out["runs"] = len(runs)
    return out


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu": model,
        "captured_source": source_digest(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "captured": ver("captured"),
        "msgspec": ver("msgspec"),
        "uvloop": ver("uvloop"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def source_digest() -> str:
    """A short hash of the `captured` package's source: which code a result was measured on."""
    import captured

    h = hashlib.sha256()
    root = Path(captured.__file__).parent
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def ratios(results: dict[str, dict[str, Any]], of: str = "captured", to: str = "naive") -> dict[str, float]:
    """`of` / `to` for records/s and CPU s per million records; empty unless both ran."""
    if of not in results or to not in results:
        return {}
    c, n = results[of], results[to]

    def ratio(key: str) -> float:  # a tiny run can measure 0.00 CPU s (10 ms clock ticks)
        return float(c[key]) / float(n[key]) if n[key] else float("nan")

    return {"records_per_s": ratio("records_per_s"), "cpu_s_per_m": ratio("cpu_s_per_m")}


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells (the first the header) as aligned text lines, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def format_report(doc: dict[str, Any]) -> str:
    m, p = doc["machine"], doc["params"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"python {m['python']}, captured {m['captured']}, msgspec {m['msgspec']}, uvloop {m['uvloop']} "
        f"(captured source {m['captured_source']}); "
        f"{m['date']}",
        f"{p['records']} records, {p['senders']} senders ({p.get('sender', 'client')}), "
        f"sampling {p['sampling']} %, "
        f"{p['payload']} B payloads, rotation every {p['max_file_age_s']:.0f} s, "
        f"median of {p['repeat']} run(s), page cache {'prewarmed' if p['prewarm'] else 'cold'}",
        *([f"server environment: {' '.join(p['server_env'])}"] if p["server_env"] else []),
        *([f"S3 server: {p['s3_server']}"] if p.get("s3_server") else []),
        "",
    ]
    head = ("system", "records", "wall s", "records/s", "MB/s", "daemon CPU s", "CPU s / 1M records",
            "peak RSS MB", "lines verified")  # fmt: skip
    rows = [head]
    for r in doc["results"].values():
        verified = f"{r['lines_verified']} {'ok' if r['ok'] else 'FAILED'}"
        rows.append((r["system"], str(r["records"]), f"{r['wall_s']:.2f}", f"{r['records_per_s']:,.0f}",
                     f"{r['mb_per_s']:.1f}", f"{r['daemon_cpu_s']:.2f}", f"{r['cpu_s_per_m']:.2f}",
                     f"{r['peak_rss_mb']:.0f}", verified))  # fmt: skip
    lines += format_table(rows)
    lines.append("")
    for r in doc["results"].values():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items())) or "none"
        lines.append(
            f"{r['system']}: written {r['written']}, dropped: {dropped}; {r['output_files']} output file(s); "
            f"daemon CPU user {r['daemon_user_s']:.2f} s + sys {r['daemon_sys_s']:.2f} s, "
            f"{r['daemon_minor_faults']:.0f} minor page faults; "
            f"senders used {r['sender_cpu_s']:.2f} CPU s, {r['sender_retries']:.0f} retries (buffer full)"
        )
    rat = doc["ratios"]
    if rat:
        lines.append(
            f"captured / naive: records/s x{rat['records_per_s']:.2f} (target >= 8), "
            f"CPU s per 1M records x{rat['cpu_s_per_m']:.3f} ({1 / rat['cpu_s_per_m']:.1f}x less CPU)"
        )
    s3 = doc.get("s3_ratios")
    if s3:
        r = doc["results"]["captured-s3"]
        up = r["at_clock_stop"]
        lines.append(
            f"captured-s3 / captured: records/s x{s3['records_per_s']:.3f} (target >= 0.8), "
            f"CPU s per 1M records x{s3['cpu_s_per_m']:.3f}; "
            f"{up['files_delivered']} file(s), {up['bytes_delivered'] / MB:.0f} MB uploaded before the clock "
            f"stopped; meanwhile the uploader process used {r['uploader_cpu_s']:.2f} CPU s "
            f"(peak RSS {r['uploader_peak_rss_mb']:.0f} MB), the S3 server {r['s3_server_cpu_s']:.2f} CPU s"
        )
    idle = doc.get("idle_load_ratios")
    if idle:
        lines.append(
            f"captured-idle-load / captured: records/s x{idle['records_per_s']:.3f}, "
            f"CPU s per 1M records x{idle['cpu_s_per_m']:.3f} (a busy process beside the daemon, by itself)"
        )
    eps = doc.get("endpoints_ratios")
    if eps:
        lines.append(
            f"captured-endpoints ({p['endpoints']} endpoints) / captured (1): "
            f"records/s x{eps['records_per_s']:.3f}, "
            f"CPU s per 1M records x{eps['cpu_s_per_m']:.3f} (target <= 1.05)"
        )
    zstd = doc.get("zstd_ratios")
    if zstd:
        r = doc["results"]["captured-zstd"]
        z = r["compression"]
        plain_cpu = doc["results"]["captured"]["cpu_s_per_m"]
        lines.append(
            f"captured-zstd / captured: records/s x{zstd['records_per_s']:.3f}, "
            f"CPU s per 1M records x{zstd['cpu_s_per_m']:.3f} with the compressing done before the clock "
            f"stopped ({z['in_window_cpu_s']:.2f} CPU s), "
            f"x{r['cpu_s_per_m_without_compression'] / plain_cpu:.3f} without it (target <= 1.10)"
        )
        lines.append(
            f"zstd level {z['level']} on this run's captures: {z['plain_bytes'] / MB:.0f} MB -> "
            f"{z['compressed_bytes'] / MB:.1f} MB (ratio {z['ratio']:.2f}), "
            f"{z['cpu_s_per_gb']:.2f} CPU s per GB"
        )
    for r in doc["results"].values():
        if "profile_summary" in r:
            lines += ["", f"py-spy profile of {r['system']} ({r['profile']}): self % / total %"]
            lines += [f"  {s:5.1f}  {t:5.1f}  {name}" for name, s, t in r["profile_summary"]]
        elif "profile" in r:
            lines.append(f"py-spy profile of {r['system']}: {r['profile']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C so that every `finally` stops its processes and removes its files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = ["captured", "naive"] if args.only == "both" else [args.only]
    if args.s3:
        systems.insert(1, "captured-s3")
    if args.idle_load:
        systems.insert(1, "captured-idle-load")
    if args.endpoints > 1:
        systems.insert(1, "captured-endpoints")
        CapturedEndpointsServer.endpoints = args.endpoints
    if args.compression == "zstd":
        systems.insert(1, "captured-zstd")
    CapturedS3Server.uploader_nice = args.uploader_nice
    CapturedServer.fsync_interval_s = args.spool_fsync
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with contextlib.ExitStack() as stack:
        if args.s3:
            server_class = SinkServer if args.s3_server == "sink" else MotoServer
            moto = server_class(max_lifetime=args.timeout * args.repeat + 600).start()
            stack.callback(moto.stop)
            if args.s3_server_priority == "idle":
                set_idle_priority(moto.proc.pid)
            CapturedS3Server.moto = moto
        for i in range(args.repeat):
            for system in systems:
                if not args.json:
                    print(f"run {i + 1}/{args.repeat}: {system} ...", file=sys.stderr, flush=True)
                runs[system].append(run_once(system, args, i))
    results = {s: median_result(r) if len(r) > 1 else r[0] for s, r in runs.items()}
    doc = {
        "machine": machine(),
        "params": {
            "records": args.records,
            "senders": args.senders,
            "sampling": args.sampling,
            "payload": args.payload,
            "payload_bytes": PAYLOAD_SIZES[args.payload],
            "repeat": args.repeat,
            "max_file_age_s": MAX_FILE_AGE_S,
            "prewarm": args.prewarm,
            "server_env": args.server_env,
            "uploader_nice": args.uploader_nice,
            "spool_fsync": args.spool_fsync,
            "sender": args.sender,
            "s3_server": args.s3_server if args.s3 else None,
            "endpoints": args.endpoints,
            "compression": args.compression,
        },
        "results": results,
        "ratios": ratios(results),
        "s3_ratios": ratios(results, "captured-s3", "captured"),
        "idle_load_ratios": ratios(results, "captured-idle-load", "captured"),
        "endpoints_ratios": ratios(results, "captured-endpoints", "captured"),
        "zstd_ratios": ratios(results, "captured-zstd", "captured"),
    }
    if args.repeat > 1:
        doc["runs"] = runs
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
