"""Capture at the rates model servers see: what it costs the sender and the daemon per record.

One `captured serve` (bench/servers.py, `file://` destination, 100 % sampling) runs for the whole
script. For each rate, a fresh sender process (multiprocessing, spawn) runs a paced loop for
`--seconds`: it sleeps until each record's absolute deadline (no busy-wait), takes a 250-byte CSV
pair from captured/testing/data.py and calls `capture()`. The baseline is the same loop in the
same kind of process without the call; baseline and capture alternate `--repeat` times and the
medians are reported.

A capture run first sends 100 warm-up records and flushes them (connection made, code warm). Over
the paced loop (and, for capture, the final `flush()`), the sender measures its own CPU time
(getrusage, every thread: the client's I/O thread included), the daemon's CPU time (the summed run
time of its threads from /proc/<pid>/task/*/schedstat, in ns; psutil's tick-resolution figure is
kept in the JSON as a check) and the time of every `capture()` call (perf_counter_ns). A run is ok
when `flush()` returned True, the client's counters show every record acknowledged and the
daemon's `written` counter grew by as many records.

    python bench/paced.py                                   # 100, 1000, 10000 records/s, 10 s, 3 pairs
    python bench/paced.py --rates 100,1000 --seconds 2 --repeat 1
    python bench/paced.py --client-option linger_s=0.005   # keyword arguments for the client
    python bench/paced.py --client async --json            # AsyncCaptureClient on asyncio, JSON out

Columns: achieved/s (records / window), loop µs/rec (the baseline loop's own CPU: sleeping, timing),
client µs/rec (sender CPU, capture minus baseline, median of the pairs), daemon µs/rec (its CPU in
the capture window, idle timers included; the idle share is printed below the table), sum and the
sum as % of one core at the achieved rate, capture() mean / p99 / max (the call alone, in µs),
no-op call µs (the baseline's mean time for calling a function that does nothing with the same
arguments: what any call costs at that pace, where caches are cold after each sleep).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import multiprocessing as mp
import os
import queue
import resource
import signal
import statistics
import sys
import time
from array import array
from typing import Any

import psutil
from ingest import format_table, machine
from servers import CapturedServer

from captured.client.aio import AsyncCaptureClient
from captured.client.sync import CaptureClient
from captured.service.cli import query_status
from captured.testing.data import DISTINCT, Pair, payloads

CONTENT_TYPE = "text/csv"
PAYLOAD_BYTES = 250
#: Records captured (and flushed) before the measured loop: connection made, code paths warm.
WARMUP = 100
FLUSH_TIMEOUT_S = 30.0
MODES = ("baseline", "capture")
CLIENTS = {"sync": CaptureClient, "async": AsyncCaptureClient}


def parse_rates(text: str) -> list[float]:
    rates = list(dict.fromkeys(float(r) for r in text.split(",") if r.strip()))
    if not rates or any(not 0 < r <= 200_000 for r in rates):
        raise argparse.ArgumentTypeError("rates are records/s, 0 < rate <= 200000, comma-separated")
    return rates


def parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, raw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="CPU cost of capture at fixed record rates")
    p.add_argument("--rates", type=parse_rates, default=[100.0, 1000.0, 10000.0], help="records/s list")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each paced run (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="baseline/capture pairs per rate (default 3)")
    p.add_argument("--client", choices=sorted(CLIENTS), default="sync", help="CaptureClient or async")
    p.add_argument(
        "--client-option",
        metavar="KEY=VALUE",
        type=parse_option,
        action="append",
        default=[],
        help="keyword argument for the client's constructor (repeatable; int/float values parsed)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if args.repeat < 1 or not 0.1 <= args.seconds <= 600:
        p.error("--repeat must be positive and --seconds within 0.1..600")
    if max(args.rates) * args.seconds > 5_000_000:
        p.error("at most 5,000,000 records per run")
    args.options = dict(args.client_option)
    try:
        inspect.signature(CLIENTS[args.client]).bind("/tmp/x.sock", **args.options)
    except TypeError as exc:
        p.error(f"--client-option: {exc}")
    return args


# ---- sender process -------------------------------------------------------------------------


def daemon_cpu(proc: psutil.Process) -> tuple[float, float]:
    """(run time of every thread from schedstat in s, psutil user+system in s) of `proc`."""
    ns = 0
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        try:
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as fh:
                ns += int(fh.read().split()[0])
        except (OSError, ValueError):  # a thread that just ended
            pass
    t = proc.cpu_times()
    return ns / 1e9, t.user + t.system


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def noop(request_body: bytes, response_body: bytes, **kw: str) -> bool:
    """The baseline's stand-in for `capture()`: a call with the same arguments that does nothing.
    Its time is what any call costs in this loop (after a sleep, caches and predictors are cold)."""
    return True


def paced_sync(client: Any, pairs: list[Pair], n: int, rate: float, times: array[int]) -> int:
    """The paced loop; `client` None is the baseline (calls `noop`). Returns the refused records."""
    capture = client.capture if client is not None else noop
    period, refused, clock, ns, ct = 1.0 / rate, 0, time.perf_counter, time.perf_counter_ns, CONTENT_TYPE
    t0 = clock()
    for i in range(n):
        delay = t0 + i * period - clock()
        if delay > 0:
            time.sleep(delay)
        req, resp = pairs[i % DISTINCT]
        start = ns()
        ok = capture(req, resp, request_content_type=ct, response_content_type=ct)
        times[i] = ns() - start
        refused += not ok
    if (delay := t0 + n * period - clock()) > 0:
        time.sleep(delay)  # the window is n periods long whenever the loop keeps up
    return refused


async def paced_async(client: Any, pairs: list[Pair], n: int, rate: float, times: array[int]) -> int:
    """As `paced_sync`, yielding to the event loop before every record (as a server does per request)."""
    capture = client.capture if client is not None else noop
    period, refused, clock, ns, ct = 1.0 / rate, 0, time.perf_counter, time.perf_counter_ns, CONTENT_TYPE
    t0 = clock()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i * period - clock()))
        req, resp = pairs[i % DISTINCT]
        start = ns()
        ok = capture(req, resp, request_content_type=ct, response_content_type=ct)
        times[i] = ns() - start
        refused += not ok
    await asyncio.sleep(max(0.0, t0 + n * period - clock()))
    return refused


class Window:
    """Wall time, this process's CPU time and the daemon's, from creation to `result()`."""

    def __init__(self, daemon: psutil.Process) -> None:
        self.daemon = daemon
        self.d0, self.c0, self.t0 = daemon_cpu(daemon), own_cpu(), time.perf_counter()

    def result(self, wall: float, refused: int) -> dict[str, Any]:
        c1, d1 = own_cpu(), daemon_cpu(self.daemon)
        return {"wall_s": wall, "sender_cpu_s": c1 - self.c0, "daemon_cpu_s": d1[0] - self.d0[0],
                "daemon_cpu_s_ticks": d1[1] - self.d0[1], "refused": refused}  # fmt: skip


async def run_async(spec: dict[str, Any], pairs: list[Pair], times: array[int]) -> dict[str, Any]:
    client = AsyncCaptureClient(spec["socket"], **spec["options"]) if spec["mode"] == "capture" else None
    daemon = psutil.Process(spec["daemon_pid"])
    if client is not None:
        await client.start()
        for req, resp in pairs[:WARMUP]:
            client.capture(req, resp, request_content_type=CONTENT_TYPE, response_content_type=CONTENT_TYPE)
        if not await client.flush(FLUSH_TIMEOUT_S):
            raise RuntimeError("warm-up flush failed: is the daemon up?")
    window = Window(daemon)
    refused = await paced_async(client, pairs, spec["records"], spec["rate"], times)
    wall = time.perf_counter() - window.t0
    flushed = await client.flush(FLUSH_TIMEOUT_S) if client is not None else True  # inside the window
    res = window.result(wall, refused)
    res.update(flushed=flushed, client_stats=client.stats() if client is not None else None)
    if client is not None:
        await client.close(1.0)
    return res


def run_sync(spec: dict[str, Any], pairs: list[Pair], times: array[int]) -> dict[str, Any]:
    client = CaptureClient(spec["socket"], **spec["options"]) if spec["mode"] == "capture" else None
    daemon = psutil.Process(spec["daemon_pid"])
    if client is not None:
        for req, resp in pairs[:WARMUP]:
            client.capture(req, resp, request_content_type=CONTENT_TYPE, response_content_type=CONTENT_TYPE)
        if not client.flush(FLUSH_TIMEOUT_S):
            raise RuntimeError("warm-up flush failed: is the daemon up?")
    window = Window(daemon)
    refused = paced_sync(client, pairs, spec["records"], spec["rate"], times)
    wall = time.perf_counter() - window.t0
    flushed = client.flush(FLUSH_TIMEOUT_S) if client is not None else True  # inside the window
    res = window.result(wall, refused)
    res.update(flushed=flushed, client_stats=client.stats() if client is not None else None)
    if client is not None:
        client.close(1.0)
    return res


def sender_main(spec: dict[str, Any], out: Any) -> None:
    """Process target: one paced run; puts its result (or an error) on `out`."""
    try:
        pairs = payloads(DISTINCT, size=PAYLOAD_BYTES)
        times = array("q", bytes(8 * spec["records"]))
        if spec["client"] == "async":
            res = asyncio.run(run_async(spec, pairs, times))
        else:
            res = run_sync(spec, pairs, times)
        s = sorted(times)
        res.update(call_mean_ns=sum(s) / len(s), call_p50_ns=s[len(s) // 2],
                   call_p99_ns=s[min(len(s) - 1, len(s) * 99 // 100)], call_max_ns=s[-1])  # fmt: skip
        out.put(res)
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---- parent -----------------------------------------------------------------------------------


def run_sender(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    proc = ctx.Process(target=sender_main, args=(spec, out), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                res: dict[str, Any] = out.get(timeout=1.0 if proc.exitcode is not None else 0.5)
                break
            except queue.Empty:
                if proc.exitcode is not None:
                    raise RuntimeError(f"sender exited with {proc.exitcode} and no result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sender gave no result within {timeout_s:.0f} s") from None
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    if "error" in res:
        raise RuntimeError(f"sender failed: {res['error']}")
    return res


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one rate's runs; the client's cost is the median of paired differences."""
    base = [r for r in runs if r["mode"] == "baseline"]
    cap = [r for r in runs if r["mode"] == "capture"]
    n = cap[0]["records"]
    med = statistics.median
    client_us = med(c["sender_cpu_s"] - b["sender_cpu_s"] for b, c in zip(base, cap, strict=True)) / n * 1e6
    daemon_us = med(c["daemon_cpu_s"] for c in cap) / n * 1e6
    achieved = med(c["records"] / c["wall_s"] for c in cap)
    return {
        "rate": runs[0]["rate"],
        "records": n,
        "achieved_per_s": achieved,
        "loop_us_per_record": med(b["sender_cpu_s"] for b in base) / n * 1e6,
        "client_us_per_record": client_us,
        "daemon_us_per_record": daemon_us,
        "total_us_per_record": client_us + daemon_us,
        "core_percent": (client_us + daemon_us) * achieved / 1e4,
        "daemon_idle_core_percent": med(b["daemon_cpu_s"] / b["wall_s"] for b in base) * 100,
        "capture_mean_us": med(c["call_mean_ns"] for c in cap) / 1e3,
        "capture_p50_us": med(c["call_p50_ns"] for c in cap) / 1e3,
        "capture_p99_us": med(c["call_p99_ns"] for c in cap) / 1e3,
        "capture_max_us": max(c["call_max_ns"] for c in cap) / 1e3,
        "noop_mean_us": med(b["call_mean_ns"] for b in base) / 1e3,
        "delivered": sum(c["written"] for c in cap) - WARMUP * len(cap),
        "ok": all(r["ok"] for r in runs),
    }


def format_report(doc: dict[str, Any]) -> str:
    m, p = doc["machine"], doc["params"]
    opts = " ".join(f"{k}={v}" for k, v in p["client_options"].items()) or "defaults"
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"python {m['python']}, captured {m['captured']}, msgspec {m['msgspec']}, uvloop {m['uvloop']} "
        f"(captured source {m['captured_source']}); {m['date']}",
        f"client {p['client']} ({opts}), {PAYLOAD_BYTES} B CSV requests, {p['seconds']:g} s per run, "
        f"median of {p['repeat']} baseline/capture pair(s), sampling 100 %, file:// destination",
        "",
    ]
    head = ("rate/s", "achieved/s", "loop µs/rec", "client µs/rec", "daemon µs/rec", "sum µs/rec",
            "% of a core", "capture() mean µs", "p99 µs", "max µs", "no-op call µs", "delivered")  # fmt: skip
    rows = [head]
    for r in doc["results"]:
        rows.append((f"{r['rate']:,.0f}", f"{r['achieved_per_s']:,.0f}", f"{r['loop_us_per_record']:.2f}",
                     f"{r['client_us_per_record']:.2f}", f"{r['daemon_us_per_record']:.2f}",
                     f"{r['total_us_per_record']:.2f}", f"{r['core_percent']:.2f}",
                     f"{r['capture_mean_us']:.2f}", f"{r['capture_p99_us']:.2f}",
                     f"{r['capture_max_us']:.0f}", f"{r['noop_mean_us']:.2f}",
                     f"{r['delivered']} {'ok' if r['ok'] else 'FAILED'}"))  # fmt: skip
    lines += format_table(rows)
    lines.append("")
    idle = ", ".join(f"{r['daemon_idle_core_percent']:.2f} % at {r['rate']:,.0f}/s" for r in doc["results"])
    lines.append(f"daemon CPU while idle (during the baselines): {idle} of a core")
    lines.append(f"output: {doc['lines_verified']} lines in {doc['output_files']} file(s), "
                 f"daemon written counter {doc['written_total']}, exit code {doc['exit_code']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every `finally` stops its processes and removes its files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = CapturedServer(100, None)
    runs: list[dict[str, Any]] = []
    try:
        server.start()
        for rate in args.rates:
            n = max(1, round(rate * args.seconds))
            for rep in range(args.repeat):
                for mode in MODES:
                    if not args.json:
                        print(f"{rate:g}/s {mode} {rep + 1}/{args.repeat} ...", file=sys.stderr)
                    spec = {"mode": mode, "rate": rate, "records": n, "client": args.client,
                            "options": args.options, "socket": server.socket_path,
                            "daemon_pid": server.pid}  # fmt: skip
                    before = query_status(server.socket_path)["counters"]
                    res = run_sender(spec, args.seconds * 2 + 120)
                    after = query_status(server.socket_path)["counters"]
                    res.update(mode=mode, rate=rate, records=n, repeat=rep)
                    res["written"] = after["written"] - before["written"]
                    res["received"] = after["received"] - before["received"]
                    expected = n + WARMUP if mode == "capture" else 0
                    stats = res["client_stats"] or {"captured": 0, "acknowledged": 0}
                    res["ok"] = (res["flushed"] and res["refused"] == 0 and res["written"] == expected
                                 and stats["captured"] == stats["acknowledged"] == expected)  # fmt: skip
                    runs.append(res)
        written_total = query_status(server.socket_path)["counters"]["written"]
        exit_code = server.stop()
        lines, files = server.count_lines()
    finally:
        server.cleanup()
    results = [summarize([r for r in runs if r["rate"] == rate]) for rate in args.rates]
    params = {"rates": args.rates, "seconds": args.seconds, "repeat": args.repeat, "client": args.client,
              "client_options": args.options, "payload_bytes": PAYLOAD_BYTES, "warmup": WARMUP}  # fmt: skip
    doc = {
        "machine": machine(),
        "params": params,
        "results": results,
        "written_total": written_total,
        "lines_verified": lines,
        "output_files": files,
        "exit_code": exit_code,
        "runs": runs,
    }
    ok = exit_code == 0 and lines == written_total and all(r["ok"] for r in results)
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
