"""What `CaptureClient.capture()` costs the thread that calls it: healthy, absent and stalled daemon.

Each call is timed with `time.perf_counter_ns()` around it, in a tight loop of `-n` calls per
scenario, with the garbage collector on (as in a model server). In one run:

- baseline: the cheapest capture a user could write, a tuple appended to a list under a lock;
- healthy: `captured serve` running (bench/servers.py), the client connected, then `flush()`;
- absent: a socket path where nothing listens;
- stalled: the daemon SIGSTOPped a tenth of the way into the loop, SIGCONT after it, then `flush()`.

    python bench/client_overhead.py                 # 200,000 calls per scenario, 250-byte CSV
    python bench/client_overhead.py -n 1000000 --payload 8k --json

Calls slower than 1 ms are kept with their start time, so the report can say whether a garbage
collection pass ran during them (`gc.callbacks`). Experiment knobs, to find out why a call was slow:

    --attribute              getrusage(RUSAGE_THREAD) after every call: preempted, waited (GIL), ...
    --no-gc                  gc.disable() during the loops
    --switch-interval-ms 0.5 sys.setswitchinterval: how long a thread waits before it asks for the GIL
    --daemon-nice 19         renice the daemon's threads

See bench/README.md for every column.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import psutil
from ingest import format_table, machine
from servers import CapturedServer

from captured.client.record import DEFAULT_BUFFER_BYTES
from captured.client.sync import CaptureClient
from captured.testing.data import PAYLOAD_SIZES, Pair, payloads

CONTENT_TYPE = "text/csv"
SLOW_NS = 1_000_000
#: The stalled scenario SIGSTOPs the daemon after this fraction of its calls.
STOP_AT = 0.1
FLUSH_TIMEOUT_S = 120.0
SCENARIOS = ("baseline", "healthy", "absent", "stalled")
#: The baseline's list is emptied (outside the timed calls) this often.
DRAIN_EVERY = 8192


class Capture(Protocol):
    def __call__(
        self,
        request_body: bytes,
        response_body: bytes,
        *,
        request_content_type: str | None = ...,
        response_content_type: str | None = ...,
    ) -> bool: ...


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="time spent in CaptureClient.capture() by the caller")
    p.add_argument("-n", "--records", type=int, default=200_000, help="calls per scenario (default 200000)")
    p.add_argument("--payload", choices=sorted(PAYLOAD_SIZES), default="250", help="request body size")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--only", choices=SCENARIOS, action="append", help="run only these scenarios")
    p.add_argument("--no-gc", dest="gc", action="store_false", help="experiment: gc.disable() in the loops")
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        help="experiment: sys.setswitchinterval (the GIL hand-over interval; Python's default is 5 ms)",
    )
    p.add_argument(
        "--attribute",
        action="store_true",
        help="experiment: getrusage after every call, to say why each call > 1 ms was slow",
    )
    p.add_argument(
        "--daemon-nice", type=int, metavar="N", help="experiment: renice the daemon's threads to N"
    )
    args = p.parse_args(argv)
    if args.records < 10:
        p.error("--records must be at least 10")
    return args


# ---- measuring -----------------------------------------------------------------------------


class GcPass(NamedTuple):
    generation: int
    start_ns: int
    stop_ns: int
    thread: str
    #: Context switches of the collecting thread during the pass. The callback is Python code, so
    #: a thread waiting for the GIL can take it there: such a pass includes that wait, not only GC.
    switches: int


class GcLog:
    """Every garbage collection pass while installed (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.passes: list[GcPass] = []
        self._start = 0
        self._switches = 0
        self._main = threading.main_thread().ident

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter_ns()
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        switches = usage.ru_nvcsw + usage.ru_nivcsw
        if phase == "start":
            self._start, self._switches = now, switches
            return
        who = "main" if threading.get_ident() == self._main else threading.current_thread().name
        self.passes.append(GcPass(int(info["generation"]), self._start, now, who, switches - self._switches))

    def during(self, t0: int, d: int) -> list[GcPass]:
        return [g for g in self.passes if g.start_ns < t0 + d and g.stop_ns > t0]

    def __enter__(self) -> GcLog:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def timed_calls(
    capture: Capture, pairs: Sequence[Pair], durations: array.array[int], start: int, slow: list[list[int]]
) -> int:
    """Call `capture` once per pair, each call timed into `durations[start:]`; return the False count.

    Calls above `SLOW_NS` are also kept in `slow` as [index, start ns, duration ns].
    """
    clock = time.perf_counter_ns
    ct = CONTENT_TYPE
    rejected = 0
    i = start
    for req, resp in pairs:
        t0 = clock()
        ok = capture(req, resp, request_content_type=ct, response_content_type=ct)
        d = clock() - t0
        durations[i] = d
        if not ok:
            rejected += 1
        if d > SLOW_NS:
            slow.append([i, t0, d])
        i += 1
    return rejected


def timed_calls_attributed(
    capture: Capture, pairs: Sequence[Pair], durations: array.array[int], start: int, slow: list[list[int]]
) -> int:
    """`timed_calls`, plus this thread's rusage after every call (`--attribute`).

    A slow call is kept as [index, start ns, duration ns, voluntary switches, involuntary switches,
    minor faults] since the previous call. `getrusage` (~0.5 µs) runs outside the timed interval,
    so the durations are comparable; the loop just runs slower.
    """
    clock = time.perf_counter_ns
    usage, who = resource.getrusage, resource.RUSAGE_THREAD
    ct = CONTENT_TYPE
    rejected = 0
    i = start
    prev = usage(who)
    for req, resp in pairs:
        t0 = clock()
        ok = capture(req, resp, request_content_type=ct, response_content_type=ct)
        d = clock() - t0
        now = usage(who)
        durations[i] = d
        if not ok:
            rejected += 1
        if d > SLOW_NS:
            slow.append([i, t0, d, now.ru_nvcsw - prev.ru_nvcsw, now.ru_nivcsw - prev.ru_nivcsw,
                         now.ru_minflt - prev.ru_minflt])  # fmt: skip
        prev = now
        i += 1
    return rejected


def timer_overhead_ns(n: int = 100_000) -> int:
    """Median of two back-to-back `perf_counter_ns()` calls: what every figure includes."""
    clock = time.perf_counter_ns
    out = array.array("q", bytes(8 * n))
    for i in range(n):
        t0 = clock()
        out[i] = clock() - t0
    return sorted(out)[n // 2]


def thread_counters(native_id: int | None) -> dict[str, float]:
    """CPU seconds and context switches of one thread of this process, from /proc."""
    if native_id is None:
        return {}
    base = f"/proc/self/task/{native_id}"
    try:
        with open(f"{base}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"{base}/status") as fh:
            status = dict(line.split(":", 1) for line in fh if "ctxt_switches" in line)
    except OSError:  # the thread is gone
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "cpu_s": (int(fields[11]) + int(fields[12])) / tick,
        "minor_faults": int(fields[7]),
        "voluntary_switches": int(status["voluntary_ctxt_switches"]),
        "involuntary_switches": int(status["nonvoluntary_ctxt_switches"]),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


class Run:
    """One scenario's loop: durations, slow calls, GC passes, thread counters."""

    def __init__(self, n: int, io_thread: threading.Thread | None, attribute: bool) -> None:
        self.durations = array.array("q", bytes(8 * n))
        self.slow: list[list[int]] = []
        self.rejected = 0
        self.gclog = GcLog()
        self.io_thread = io_thread
        self.loop = timed_calls_attributed if attribute else timed_calls
        self.counters: dict[str, dict[str, float]] = {}
        self.marks: dict[str, float] = {}
        self._before: dict[str, dict[str, float]] = {}
        self._t0 = 0

    def __enter__(self) -> Run:
        # The scenario's set-up (the daemon, the slices of `pairs`) leaves young objects behind;
        # collected here, the first passes in the loop do not scan them (a fresh 180,000-element
        # list costs the first gen0 and gen1 pass about a millisecond each).
        gc.collect()
        self._before = self._sample()
        self.gclog.__enter__()
        self._t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        self.marks["loop_ms"] = self.ms(time.perf_counter_ns())
        self.gclog.__exit__()
        after = self._sample()
        self.counters = {k: delta(after[k], self._before.get(k, {})) for k in after}

    def ms(self, t_ns: int) -> float:
        """Milliseconds since the loop started."""
        return (t_ns - self._t0) / 1e6

    def _sample(self) -> dict[str, dict[str, float]]:
        out = {"main_thread": thread_counters(threading.main_thread().native_id)}
        if self.io_thread is not None:
            out["io_thread"] = thread_counters(self.io_thread.native_id)
        return out

    def segment(self, capture: Capture, pairs: Sequence[Pair], start: int) -> None:
        self.rejected += self.loop(capture, pairs, self.durations, start, self.slow)

    def cause(self, call: list[int]) -> str:
        """Why one slow call was slow, as far as the counters tell (first match wins).

        Without `--attribute` only a garbage collection pass can be seen.
        """
        _, t0, d, *usage = call
        passes = self.gclog.during(t0, d)
        in_gc = sum(min(g.stop_ns, t0 + d) - max(g.start_ns, t0) for g in passes if not g.switches)
        gc_pass = in_gc * 2 >= d  # at least half of the call, in passes that kept their core
        if not usage:
            if gc_pass:
                return "gc"
            return "switched during gc" if any(g.switches for g in passes) else "unknown"
        voluntary, involuntary, faults = usage
        if involuntary:
            return "preempted"  # the kernel gave this core to another thread or process
        if voluntary:
            return "waited"  # slept on a futex: the GIL (or the client's lock) held by another thread
        if gc_pass:
            return "gc"
        return "page faults" if faults else "on cpu"

    def summary(self) -> dict[str, Any]:
        values = sorted(self.durations)
        n = len(values)

        def pct(q: float) -> float:
            return values[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000

        passes = self.gclog.passes
        clean = [g.stop_ns - g.start_ns for g in passes if not g.switches]
        causes: dict[str, int] = {}
        for call in self.slow:
            c = self.cause(call)
            causes[c] = causes.get(c, 0) + 1
        longest = sorted(self.slow, key=lambda s: -s[2])[:10]
        return {
            "calls": n,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": values[-1] / 1000,
            "mean_us": sum(values) / n / 1000,
            "accepted": n - self.rejected,
            "returned_false": self.rejected,
            "over_1ms": sum(1 for v in values if v > SLOW_NS),
            "slow_call_causes": causes,
            "slow_calls": [
                {
                    "index": call[0],
                    "us": call[2] / 1000,
                    "at_ms": self.ms(call[1]),
                    "cause": self.cause(call),
                    "gc": [
                        f"gen{g.generation} {(g.stop_ns - g.start_ns) / 1000:,.0f} µs in {g.thread}"
                        + (f", {g.switches} switches" if g.switches else "")
                        for g in self.gclog.during(call[1], call[2])
                    ],
                    **(
                        dict(zip(("voluntary", "involuntary", "faults"), call[3:], strict=True))
                        if call[3:]
                        else {}
                    ),
                }
                for call in longest
            ],
            "gc_passes": [sum(1 for g in passes if g.generation == gen) for gen in range(3)],
            "gc_max_pause_us": max(clean, default=0) / 1000,
            "gc_passes_switched": len(passes) - len(clean),
            "gc_threads": sorted({g.thread for g in passes}),
            "threads": self.counters,
            "marks_ms": self.marks,
        }


# ---- scenarios -----------------------------------------------------------------------------


def baseline(pairs: Sequence[Pair], opts: argparse.Namespace) -> dict[str, Any]:
    """A tuple appended to a list under a lock; the list is emptied every `DRAIN_EVERY` calls.

    The emptying happens between timed calls, as a consumer thread would take the list: without
    it the list would grow by n tuples and the figures would measure fresh memory (page faults).
    """
    lock = threading.Lock()
    buf: list[tuple[Any, ...]] = []
    now = time.time

    def naive_capture(
        request_body: bytes,
        response_body: bytes,
        *,
        request_content_type: str | None = None,
        response_content_type: str | None = None,
    ) -> bool:
        with lock:
            buf.append((request_body, response_body, request_content_type, response_content_type, now()))
        return True

    taken = 0
    chunks = [(start, pairs[start : start + DRAIN_EVERY]) for start in range(0, len(pairs), DRAIN_EVERY)]
    with Run(len(pairs), None, opts.attribute) as run:
        for start, chunk in chunks:
            run.segment(naive_capture, chunk, start)
            with lock:
                taken += len(buf)
                buf.clear()
    out = run.summary()
    out["client"] = {"taken": taken}
    return out


def client_result(run: Run, client: CaptureClient, flushed: bool | None) -> dict[str, Any]:
    out = run.summary()
    stats = client.stats()
    out["client"] = stats
    out["flushed"] = flushed
    out["buffer_full"] = stats["dropped"].get("buffer_full", 0)
    return out


def connected_client(server: CapturedServer, nice: int | None) -> CaptureClient:
    server.start()
    if nice is not None:  # per thread: setpriority on a pid only renices that one thread on Linux
        for t in psutil.Process(server.pid).threads():
            os.setpriority(os.PRIO_PROCESS, t.id, nice)
    client = CaptureClient(server.socket_path)
    if not client.flush(timeout=10.0):  # connected, and the daemon answers
        client.close(timeout=0.1)
        raise RuntimeError(f"the daemon did not answer:\n{server.log_tail()}")
    return client


def healthy(pairs: Sequence[Pair], opts: argparse.Namespace) -> dict[str, Any]:
    server = CapturedServer(100, None)
    client: CaptureClient | None = None
    try:
        client = connected_client(server, opts.daemon_nice)
        with Run(len(pairs), client._thread, opts.attribute) as run:
            run.segment(client.capture, pairs, 0)
        out = client_result(run, client, client.flush(timeout=FLUSH_TIMEOUT_S))
        out["daemon_received"], out["daemon_written"], _ = server.counts()
        return out
    finally:
        if client is not None:
            client.close(timeout=1.0)
        server.cleanup()


def absent(pairs: Sequence[Pair], opts: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="cdb-", dir="/tmp")
    client: CaptureClient | None = None
    try:
        client = CaptureClient(os.path.join(tmp, "nobody.sock"))
        with Run(len(pairs), client._thread, opts.attribute) as run:
            run.segment(client.capture, pairs, 0)
        return client_result(run, client, None)
    finally:
        if client is not None:
            client.close(timeout=0.1)
        shutil.rmtree(tmp, ignore_errors=True)


def stalled(pairs: Sequence[Pair], opts: argparse.Namespace) -> dict[str, Any]:
    server = CapturedServer(100, None)
    client: CaptureClient | None = None
    stopped = False
    try:
        client = connected_client(server, opts.daemon_nice)
        k = int(len(pairs) * STOP_AT)
        head, tail = pairs[:k], pairs[k:]
        with Run(len(pairs), client._thread, opts.attribute) as run:
            run.segment(client.capture, head, 0)
            os.kill(server.pid, signal.SIGSTOP)  # between two timed calls, not inside one
            stopped = True
            run.marks["sigstop_ms"] = run.ms(time.perf_counter_ns())
            run.segment(client.capture, tail, k)
        os.kill(server.pid, signal.SIGCONT)
        stopped = False
        out = client_result(run, client, client.flush(timeout=FLUSH_TIMEOUT_S))
        out["sigstop_after_calls"] = k
        stalled_part = run.durations[k:]
        out["while_stopped"] = {
            "calls": len(stalled_part),
            "max_us": max(stalled_part) / 1000,
            "over_1ms": sum(1 for v in stalled_part if v > SLOW_NS),
        }
        return out
    finally:
        if stopped:
            os.kill(server.pid, signal.SIGCONT)
        if client is not None:
            client.close(timeout=1.0)
        server.cleanup()


RUNNERS: dict[str, Callable[[Sequence[Pair], argparse.Namespace], dict[str, Any]]] = {
    "baseline": baseline,
    "healthy": healthy,
    "absent": absent,
    "stalled": stalled,
}


def checks(name: str, r: dict[str, Any]) -> bool:
    """The counts add up; after the daemon is back, flush() confirms everything accepted."""
    if name == "baseline":
        return bool(r["client"]["taken"] == r["calls"])
    c = r["client"]
    ok = bool(c["captured"] == r["calls"] and r["returned_false"] == sum(c["dropped"].values()))
    if name in ("healthy", "stalled"):
        ok = ok and bool(r["flushed"] and c["acknowledged"] == r["accepted"])
    return ok


# ---- report --------------------------------------------------------------------------------


def format_report(doc: dict[str, Any]) -> str:
    m, p = doc["machine"], doc["params"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"python {m['python']}, captured {m['captured']}, msgspec {m['msgspec']} "
        f"(captured source {m['captured_source']}); {m['date']}",
        f"{p['records']} calls per scenario, {p['payload_bytes']} B CSV request + 12 B response, "
        f"content types given; client buffer {p['buffer_bytes'] // 2**20} MiB (default); "
        f"gc {'enabled' if p['gc'] else 'DISABLED'} (thresholds {p['gc_thresholds']}); "
        f"GIL switch interval {p['switch_interval_ms']:g} ms; perf_counter_ns pair {p['timer_ns']} ns "
        "(included in every figure)",
        "",
    ]
    head = ("scenario", "calls", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "mean µs", "accepted",
            "dropped (buffer_full)", "calls > 1 ms")  # fmt: skip
    rows = [head]
    for name, r in doc["results"].items():
        rows.append((name, str(r["calls"]), f"{r['p50_us']:.2f}", f"{r['p99_us']:.2f}",
                     f"{r['p999_us']:.1f}", f"{r['max_us']:,.0f}", f"{r['mean_us']:.2f}",
                     str(r["accepted"]), str(r.get("buffer_full", 0)), str(r["over_1ms"])))  # fmt: skip
    lines += format_table(rows)
    lines.append("")
    results = doc["results"]
    base = results.get("baseline")
    for name, r in results.items():
        lines += [f"{name}: " + "; ".join(details(name, r, base))]
        for s in r["slow_calls"][:5]:
            why = s["cause"] + (f" ({'; '.join(s['gc'])})" if s["gc"] else "")
            if "voluntary" in s:
                why += (f" ({s['voluntary']} voluntary / {s['involuntary']} involuntary switches, "
                        f"{s['faults']} faults)")  # fmt: skip
            lines.append(f"    call #{s['index']} at +{s['at_ms']:.1f} ms: {s['us']:,.0f} µs, {why}")
    lines += ["", *targets(results)]
    return "\n".join(lines)


def details(name: str, r: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """The lines under the table: where the time went besides the calls themselves."""
    t = r["threads"]
    main = t.get("main_thread", {})
    causes = ", ".join(f"{k} {v}" for k, v in sorted(r["slow_call_causes"].items()))
    out = [
        f"{r['over_1ms']} calls > 1 ms" + (f" ({causes})" if causes else ""),
        f"gc passes gen0/1/2 {'/'.join(map(str, r['gc_passes']))} "
        f"(in {', '.join(r['gc_threads']) or '-'}; longest {r['gc_max_pause_us']:,.0f} µs "
        f"among the {sum(r['gc_passes']) - r['gc_passes_switched']} without a context switch)",
        f"loop {r['marks_ms']['loop_ms']:.0f} ms",
        f"calling thread: {main.get('voluntary_switches', 0):.0f} voluntary / "
        f"{main.get('involuntary_switches', 0):.0f} involuntary switches, "
        f"{main.get('minor_faults', 0):.0f} minor faults",
    ]
    if "io_thread" in t:
        out.append(f"client I/O thread {t['io_thread'].get('cpu_s', 0):.2f} CPU s")
    if "sigstop_ms" in r["marks_ms"]:
        out.append(f"SIGSTOP at +{r['marks_ms']['sigstop_ms']:.1f} ms")
    if base is not None and name != "baseline":
        out.append(
            f"above baseline: p50 {r['p50_us'] - base['p50_us']:+.2f} µs, "
            f"p99 {r['p99_us'] - base['p99_us']:+.2f} µs"
        )
    if name != "baseline":
        c = r["client"]
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(c["dropped"].items())) or "none"
        flushed = "" if r["flushed"] is None else f", flush {'ok' if r['flushed'] else 'FAILED'}"
        out.append(f"acknowledged {c['acknowledged']}, dropped: {dropped}{flushed}")
    if not r["ok"]:
        out.append("COUNTS DO NOT ADD UP")
    return out


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    if "healthy" in results:
        p99 = results["healthy"]["p99_us"]
        out.append(f"target p99 <= 10 µs (healthy): {p99:.2f} µs, {'met' if p99 <= 10 else 'NOT met'}")
    if "absent" in results:
        r = results["absent"]
        verdict = "met" if r["over_1ms"] == 0 else "NOT met"
        out.append(
            f"target no call > 1 ms (absent): max {r['max_us']:,.0f} µs, {r['over_1ms']} calls, {verdict}"
        )
    if "stalled" in results:
        r, w = results["stalled"], results["stalled"]["while_stopped"]
        verdict = "met" if w["over_1ms"] == 0 else "NOT met"
        out.append(
            f"target no call > 1 ms (stalled): after the SIGSTOP max {w['max_us']:,.0f} µs, "
            f"{w['over_1ms']} calls, {verdict}; "
            f"before it (daemon running) {r['over_1ms'] - w['over_1ms']} calls"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C so that every `finally` resumes and kills its daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    size = PAYLOAD_SIZES[args.payload]
    pairs = payloads(args.records, seed=0, size=size)
    names = [s for s in SCENARIOS if not args.only or s in args.only]
    timer = timer_overhead_ns()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if not args.json:
            print(f"{name} ...", file=sys.stderr, flush=True)
        if not args.gc:
            gc.disable()
        try:
            results[name] = RUNNERS[name](pairs, args)
        finally:
            gc.enable()
        results[name]["ok"] = checks(name, results[name])
    doc = {
        "machine": {**machine(), "psutil": psutil.__version__},
        "params": {
            "records": args.records,
            "payload": args.payload,
            "payload_bytes": size,
            "buffer_bytes": DEFAULT_BUFFER_BYTES,
            "gc": args.gc,
            "gc_thresholds": gc.get_threshold(),
            "switch_interval_ms": sys.getswitchinterval() * 1000,
            "timer_ns": timer,
            "sigstop_at": STOP_AT,
            "attribute": args.attribute,
            "daemon_nice": args.daemon_nice,
            "baseline_drain_every": DRAIN_EVERY,
        },
        "results": results,
        "targets": targets(results),
    }
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
