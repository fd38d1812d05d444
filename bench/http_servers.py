"""What capture costs real HTTP model servers: requests/s and latency with and without it.

Two servers run the same small model (bench/http_apps.py: POST /invocations parses a CSV line of
about 30 floats and answers a dot product as text/csv), in arms that alternate in each round:

- flask: Flask under `gunicorn -w 4 --preload` (pre-forked sync workers): no capture, one
  `CaptureClient` made before the fork (each worker gets its own) with `capture()` per request,
  and `WSGICaptureMiddleware` around the app (the one line a user adds);
- fastapi: FastAPI under uvicorn (one process): no capture, the thread `CaptureClient`,
  `AsyncCaptureClient` (started and closed in the lifespan handler), and `CaptureMiddleware`
  (`app.add_middleware`).

One `captured serve` (bench/servers.py, file:// destination in a temporary directory, 100 %
sampling) runs for the whole run; its socket reaches the apps in `CAPTURED_BENCH_SOCKET`. A load
generator in another process (asyncio, no HTTP library) keeps `--concurrency` HTTP/1.1 connections
busy against 127.0.0.1, each sending its next request as soon as the response arrived, for a 2 s
warm-up and then `--seconds` counted. Gunicorn's sync workers close the connection after every
response, so there the load generator reconnects, and the latency includes the connect.

After each capture arm the app server is stopped with SIGTERM (gunicorn workers flush at exit,
uvicorn's lifespan closes the client), and the daemon's `counters.written` must have grown by the
number of 200 responses the load generator received, warm-up included.

Columns, per arm (medians over `--repeat` rounds; errors and written are summed): req/s (200
responses completed in the counted seconds), p50/p99 ms (send to last response byte), x req/s and
x p99 (that arm / the no-capture arm), app CPU us/req (user + system CPU of the app server's
process tree per 200 response, warm-up included: capture() and the client's I/O thread show up
here), daemon us/req (the same for `captured serve`), errors (non-200, broken connections,
stalls), written (the daemon's `written` growth / 200 responses).

    python bench/http_servers.py                          # both servers, 16 connections, 10 s, 3 rounds
    python bench/http_servers.py --only flask --seconds 3 --repeat 1
    python bench/http_servers.py --concurrency 64 --json  # one JSON document

Needs (the `bench` extra): flask, gunicorn, fastapi, uvicorn. Without uvicorn[standard] uvicorn
parses HTTP with h11 (pure Python) and runs on uvloop (a dependency of captured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servers import CapturedServer

BENCH_DIR = Path(__file__).resolve().parent
WARMUP_S = 2.0
#: Seconds a load run may overrun before the load generator gives up on stalled responses.
GRACE_S = 20.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
ARMS = {"flask": ("none", "thread", "middleware"), "fastapi": ("none", "thread", "async", "middleware")}
ARM_NAMES = {
    "none": "no capture",
    "thread": "CaptureClient",
    "async": "AsyncCaptureClient",
    "middleware": "middleware",
}
METRICS = ("requests_per_s", "p50_ms", "p99_ms", "app_cpu_us_per_req", "daemon_cpu_us_per_req")


# ---- load generator (runs in its own process: `http_servers.py _load PORT C SECONDS`) -------------


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, server closes) of a response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    return status, length, close


async def _load(port: int, concurrency: int, seconds: float) -> dict[str, Any]:
    from captured.testing.data import payloads

    requests = [
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: text/csv\r\n"
        b"Accept: text/csv\r\nContent-Length: %d\r\n\r\n%s" % (port, len(req), req)
        for req, _ in payloads(64)
    ]
    tally = {"ok": 0, "measured": 0, "bad_status": 0, "io_errors": 0, "connects": 0}
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, end = start + WARMUP_S, start + WARMUP_S + seconds

    async def connection(k: int) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            while (t0 := time.perf_counter()) < end:
                k += 1
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        tally["connects"] += 1
                    writer.write(requests[k % len(requests)])
                    status, length, close = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                    await reader.readexactly(length)
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                    tally["io_errors"] += 1
                    if writer is not None:
                        writer.close()
                    writer = None
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                if status == 200:
                    tally["ok"] += 1
                    if measure_from <= t1 <= end:
                        tally["measured"] += 1
                        latencies.append(t1 - t0)
                else:
                    tally["bad_status"] += 1
                if close:
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    stalled = False
    try:
        async with asyncio.timeout(WARMUP_S + seconds + GRACE_S):
            await asyncio.gather(*(connection(i * 7) for i in range(concurrency)))
    except TimeoutError:
        stalled = True  # responses still missing: the written check will say so
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0.0

    return {**tally, "stalled": stalled, "requests_per_s": tally["measured"] / seconds,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}  # fmt: skip


def load_main(argv: list[str]) -> None:
    port, concurrency, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    import uvloop  # a dependency of captured: the lightest event loop for the load generator

    print(json.dumps(uvloop.run(_load(port, concurrency, seconds))))


# ---- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def app_command(server: str, port: int, workers: int) -> list[str]:
    if server == "flask":
        return [sys.executable, "-m", "gunicorn", "-w", str(workers), "--preload", "-b", f"127.0.0.1:{port}",
                "--graceful-timeout", "10", "--log-level", "warning", "http_apps:flask_app()"]  # fmt: skip
    return [sys.executable, "-m", "uvicorn", "--factory", "http_apps:fastapi_app", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--log-level", "warning", "--lifespan", "on",
            "--timeout-graceful-shutdown", "10"]  # fmt: skip


def tree_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and its descendants, by pid."""
    import psutil

    out: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
    return out


def killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def written(socket_path: str) -> int:
    from captured.service.cli import query_status

    return int(query_status(socket_path)["counters"]["written"])


def run_arm(
    server: str, arm: str, daemon: CapturedServer, args: argparse.Namespace, logs: str
) -> dict[str, Any]:
    """Start the app server, load it, stop it; the written check for capture arms."""
    import psutil

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTURED_BENCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    if arm != "none":
        env |= {"CAPTURED_BENCH_SOCKET": daemon.socket_path, "CAPTURED_BENCH_CLIENT": arm}
    before = written(daemon.socket_path)
    log_path = os.path.join(logs, f"{server}-{arm}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(app_command(server, port, args.workers), env=env, stdout=log, stderr=log,
                                cwd=BENCH_DIR, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} did not start:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # let the other pre-forked workers finish booting
        app_cpu0, daemon_cpu0 = tree_cpu(proc.pid), sum(psutil.Process(daemon.pid).cpu_times()[:2])
        load_cmd = [sys.executable, str(BENCH_DIR / "http_servers.py"), "_load", str(port)]
        load_cmd += [str(args.concurrency), str(args.seconds)]
        timeout = WARMUP_S + args.seconds + GRACE_S + 30
        load = subprocess.run(load_cmd, capture_output=True, cwd=BENCH_DIR, timeout=timeout)
        if load.returncode:
            raise RuntimeError(f"the load generator failed:\n{load.stderr.decode(errors='replace')[-3000:]}")
        result: dict[str, Any] = json.loads(load.stdout)
        app_cpu1 = tree_cpu(proc.pid)
        app_cpu = sum(t - app_cpu0.get(pid, 0.0) for pid, t in app_cpu1.items())
        proc.send_signal(signal.SIGTERM)  # gunicorn: the master stops the workers, they flush at exit
        proc.wait(STOP_TIMEOUT_S)
    finally:
        killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ok = result["ok"]
    grown = written(daemon.socket_path) - before
    deadline = time.monotonic() + 5.0
    while arm != "none" and grown < ok and time.monotonic() < deadline:
        time.sleep(0.05)  # acknowledged means written already; this only absorbs a slow status reply
        grown = written(daemon.socket_path) - before
    daemon_cpu = sum(psutil.Process(daemon.pid).cpu_times()[:2]) - daemon_cpu0
    result["written"], result["written_ok"] = grown, grown == (ok if arm != "none" else 0)
    result["app_cpu_us_per_req"] = app_cpu / max(ok, 1) * 1e6
    result["daemon_cpu_us_per_req"] = daemon_cpu / max(ok, 1) * 1e6
    result["exit_code"] = proc.returncode
    return result


# ---- report ----------------------------------------------------------------------------------------


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server, arms in runs.items():
        out[server] = {}
        for arm, results in arms.items():
            med = {m: statistics.median(r[m] for r in results) for m in METRICS}
            out[server][arm] = med | {
                "errors": sum(r["bad_status"] + r["io_errors"] + r["stalled"] for r in results),
                "ok": sum(r["ok"] for r in results),
                "written": sum(r["written"] for r in results),
                "written_ok": all(r["written_ok"] for r in results),
                "runs": results,
            }
        base = out[server].get("none")
        for arm in out[server].values():
            rps = base["requests_per_s"] if base else 0
            arm["throughput_ratio"] = arm["requests_per_s"] / rps if rps else None
            arm["p99_ratio"] = arm["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else None
    return out


def print_tables(summary: dict[str, Any], args: argparse.Namespace) -> None:
    titles = {"flask": f"flask: gunicorn -w {args.workers} --preload (sync workers)",
              "fastapi": "fastapi: uvicorn, 1 process"}  # fmt: skip
    for server, arms in summary.items():
        print(f"\n{titles[server]}; {args.concurrency} connections, {args.seconds:g} s, "
              f"median of {args.repeat}")  # fmt: skip
        print(f"{'arm':<20} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'x req/s':>7} {'x p99':>6} "
              f"{'app CPU us/req':>14} {'daemon us/req':>13} {'errors':>6}  written")  # fmt: skip
        for arm, s in arms.items():
            check = f"{s['written']}/{s['ok']} {'ok' if s['written_ok'] else 'MISMATCH'}"
            check = "-" if arm == "none" else check
            print(f"{ARM_NAMES[arm]:<20} {s['requests_per_s']:>8.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} "
                  f"{s['throughput_ratio'] or 0:>7.3f} {s['p99_ratio'] or 0:>6.2f} "
                  f"{s['app_cpu_us_per_req']:>14.0f} {s['daemon_cpu_us_per_req']:>13.1f} {s['errors']:>6}  "
                  f"{check}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="HTTP model servers with and without capture")
    p.add_argument("--only", choices=["flask", "fastapi"], help="one server only (default: both)")
    p.add_argument("--concurrency", type=int, default=16, help="keep-alive connections (default 16)")
    p.add_argument("--seconds", type=float, default=10.0, help="counted seconds per arm, after a 2 s warm-up")
    p.add_argument("--repeat", type=int, default=3, help="rounds of alternating arms (default 3): medians")
    p.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = p.parse_args(argv)
    if not (1 <= args.concurrency <= 1024 and 0.5 <= args.seconds <= 600 and 1 <= args.repeat <= 20):
        p.error("--concurrency 1..1024, --seconds 0.5..600, --repeat 1..20")
    if not 1 <= args.workers <= 32:
        p.error("--workers 1..32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ingest import machine
    from servers import CapturedServer

    class Daemon(CapturedServer):
        def command(self) -> list[str]:
            return ["setsid", *super().command()]  # its own process group, killed whole at the end

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    tmp = tempfile.mkdtemp(prefix="cdb-http-")
    daemon = Daemon(sampling=100, workdir=None)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        daemon.start()
        for server in [args.only] if args.only else list(ARMS):
            runs[server] = {arm: [] for arm in ARMS[server]}
            for rnd in range(args.repeat):
                arms = ARMS[server][rnd % len(ARMS[server]) :] + ARMS[server][: rnd % len(ARMS[server])]
                for arm in arms:
                    r = run_arm(server, arm, daemon, args, tmp)
                    runs[server][arm].append(r)
                    line = f"{server} {ARM_NAMES[arm]} round {rnd + 1}: {r['requests_per_s']:.0f} req/s, "
                    line += f"p99 {r['p99_ms']:.2f} ms, written {r['written']}/{r['ok']}, "
                    line += f"errors {r['bad_status'] + r['io_errors']}{', STALLED' if r['stalled'] else ''}"
                    print(line, file=sys.stderr)
        daemon.stop()
    finally:
        if daemon.proc is not None:
            killpg(daemon.pid, signal.SIGKILL)
        daemon.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    if args.json:
        from importlib.metadata import version

        env = machine() | {name: version(name) for name in ("flask", "gunicorn", "fastapi", "uvicorn")}
        print(json.dumps({"machine": env, "options": vars(args), "servers": summary}, indent=2))
    else:
        print_tables(summary, args)
    results = [a for s in summary.values() for a in s.values()]
    return 0 if all(a["written_ok"] and a["ok"] and not a["errors"] for a in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["_load"]:
        load_main(sys.argv[2:])
    else:
        sys.exit(main())
