"""Reading captures back: `captured read --stats` against DuckDB on the same files, in one run.

A seeded generator first writes `-n` records as a daemon would (not timed): 2 endpoints x 2
variants, records spread over 6 hours, files of at most 10,000 lines named
`{MM}-{SS}-{mmm}-{uuid4}.jsonl` in their hour's directory (`.jsonl.zst`, one zstd frame per file,
with `--zstd`), 250-byte CSV requests and 12-byte scores (`captured.testing.data.payloads`), an
`inferenceId` and a uuid4 `eventId` per record, `inferenceTime` in the file's hour.

Then, alternating (captured first in odd rounds, DuckDB in even ones), `--repeat` times, each in a
fresh subprocess (process start and imports count on both sides):

- captured: `python -m captured read DIR --stats`, which parses every line, decodes both sides
  and prints records per endpoint/variant/hour, encodings, content types and body sizes. Its
  total must be `-n`.
- duckdb: `python -c 'import duckdb; ...'` running one query over the same files:
  `read_json(..., format='newline_delimited', filename=true, columns={...})` with the record's
  schema given (spec section 3: no sampling pass to infer it, `inferenceTime` parsed as
  TIMESTAMPTZ), materialized once, then what `--stats` reports: the total with the time range,
  files with records, encoding mismatches and body sizes per side (min, p50, p99, max, total),
  records per endpoint/variant (from the path) and hour (of `inferenceTime`), and per side's
  encoding and content type. Its total must be `-n`.

Columns (medians over the runs): wall s (start of the process to its exit), records/s (records /
wall s), CPU s (user + system of the process, from `wait4`), peak RSS MB, then captured / duckdb
for records/s and for CPU s. A run that does not count every record fails the benchmark (exit 1).

    python bench/read.py                      # 1,000,000 records, 3 runs each
    python bench/read.py -n 200000 --zstd     # .jsonl.zst files
    python bench/read.py --duckdb-threads 1   # DuckDB on one thread (captured read uses one)
    python bench/read.py -n 2000 --repeat 1 --json

`--captured-mode documents` times `captured read DIR` (one JSON document per record, counted on
its stdout) instead of `captured read DIR --stats`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import msgspec
import zstandard
from ingest import format_table, machine

from captured.testing.data import payloads

ENDPOINTS = ("churn-endpoint", "fraud-endpoint")
VARIANTS = ("AllTraffic", "Shadow")
HOURS = 6
FIRST_HOUR = dt.datetime(2024, 6, 1, 8, tzinfo=dt.UTC)
LINES_PER_FILE = 10_000
SEED = 20240601
SYSTEMS = ("captured", "duckdb")
#: A record as the daemon writes it (spec section 3): request and response data (JSON strings),
#: eventId, inferenceId, inferenceTime.
LINE = (
    b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":%b,'
    b'"encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT",'
    b'"data":%b,"encoding":"CSV"}},"eventMetadata":{"eventId":"%b","inferenceId":"%d","inferenceTime":"%b"},'
    b'"eventVersion":"0"}\n'
)
METRICS = ("wall_s", "records_per_s", "cpu_s", "peak_rss_mb")

SIDE = "STRUCT(observedContentType VARCHAR, mode VARCHAR, data VARCHAR, encoding VARCHAR)"
#: The record's schema (spec section 3), as DuckDB's `columns=`: no sampling pass to infer it.
COLUMNS = {
    "captureData": f"STRUCT(endpointInput {SIDE}, endpointOutput {SIDE})",
    "eventMetadata": "STRUCT(eventId VARCHAR, inferenceId VARCHAR, customAttributes VARCHAR, "
    "inferenceTime TIMESTAMPTZ)",
    "eventVersion": "VARCHAR",
}
#: What `captured read --stats` reports, from one scan of the files (the CTE is materialized once):
#: the total with the time range, files with records, encoding mismatches and body sizes per side
#: (min, p50, p99, max, total), then records per endpoint/variant/hour and per side's encoding and
#: content type.
QUERY = """\
WITH r AS MATERIALIZED (
  SELECT
    filename,
    regexp_extract(filename, '([^/]+)/([^/]+)/\\d{{4}}/\\d{{2}}/\\d{{2}}/\\d{{2}}/[^/]+$',
                   ['endpoint', 'variant']) AS place,
    eventMetadata.inferenceTime AS time,
    captureData.endpointInput.encoding AS in_encoding,
    captureData.endpointInput.observedContentType AS in_type,
    strlen(captureData.endpointInput.data) AS in_bytes,
    captureData.endpointOutput.encoding AS out_encoding,
    captureData.endpointOutput.observedContentType AS out_type,
    strlen(captureData.endpointOutput.data) AS out_bytes
  FROM read_json('{glob}', format='newline_delimited', compression='{compression}',
                 filename=true, columns={columns})
)
SELECT 'total' AS kind, count(*) AS records, min(time) AS first, max(time) AS last,
       count(DISTINCT filename) AS files_with_records,
       count(*) FILTER (WHERE in_encoding <> out_encoding) AS encoding_mismatch,
       min(in_bytes) AS in_min, approx_quantile(in_bytes, 0.5) AS in_p50,
       approx_quantile(in_bytes, 0.99) AS in_p99, max(in_bytes) AS in_max, sum(in_bytes) AS in_total,
       min(out_bytes) AS out_min, approx_quantile(out_bytes, 0.5) AS out_p50,
       approx_quantile(out_bytes, 0.99) AS out_p99, max(out_bytes) AS out_max, sum(out_bytes) AS out_total
FROM r
UNION ALL BY NAME
SELECT 'hour' AS kind, place.endpoint AS endpoint, place.variant AS variant,
       date_trunc('hour', time) AS hour, count(*) AS records
FROM r GROUP BY ALL
UNION ALL BY NAME
SELECT 'input' AS kind, in_encoding AS encoding, in_type AS content_type, count(*) AS records
FROM r WHERE in_encoding IS NOT NULL GROUP BY ALL
UNION ALL BY NAME
SELECT 'output' AS kind, out_encoding AS encoding, out_type AS content_type, count(*) AS records
FROM r WHERE out_encoding IS NOT NULL GROUP BY ALL"""

#: The DuckDB side's process: argv = query, threads (0: DuckDB's default). Prints the total and
#: the number of result rows as JSON.
DUCKDB_CHILD = """\
import json, sys
import duckdb
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute("SET enable_progress_bar = false")  # it would write to stdout after 2 s
if int(sys.argv[2]):
    con.execute(f"SET threads = {int(sys.argv[2])}")
cur = con.execute(sys.argv[1])
names = [d[0] for d in cur.description]
rows = [dict(zip(names, row)) for row in cur.fetchall()]
total = sum(r["records"] for r in rows if r["kind"] == "total")
print(json.dumps({"records": total, "rows": len(rows), "threads": con.execute(
    "SELECT current_setting('threads')").fetchone()[0], "duckdb": duckdb.__version__}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="captured read --stats against DuckDB on the same capture files")
    p.add_argument("-n", "--records", type=int, default=1_000_000, help="records to write (default 1000000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per system, alternating (default 3)")
    p.add_argument("--zstd", action="store_true", help="write .jsonl.zst files (one zstd frame each)")
    p.add_argument("--workdir", help="where the data goes (default: a directory under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the data (and print where it is)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument(
        "--captured-mode",
        choices=["stats", "documents"],
        default="stats",
        help="stats (default): `captured read DIR --stats`; documents: `captured read DIR` (one JSON "
        "document per record, counted)",
    )
    p.add_argument(
        "--duckdb-threads", type=int, default=0, metavar="N", help="DuckDB's threads (default 0: its default)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take before it fails")
    args = p.parse_args(argv)
    if args.records < 1 or args.repeat < 1:
        p.error("--records and --repeat must be at least 1")
    return args


# ---- the data ------------------------------------------------------------------------------------


def generate(root: Path, records: int, *, compress: bool, seed: int = SEED) -> dict[str, Any]:
    """Write `records` capture lines under `root`, as a daemon would; what was written."""
    rng = random.Random(seed)
    pairs = [
        (msgspec.json.encode(req.decode()), msgspec.json.encode(resp.decode()))
        for req, resp in payloads(1024, seed)
    ]
    groups = [
        (e, v, FIRST_HOUR + dt.timedelta(hours=h)) for e in ENDPOINTS for v in VARIANTS for h in range(HOURS)
    ]
    zc = zstandard.ZstdCompressor(level=3)
    suffix = ".jsonl.zst" if compress else ".jsonl"
    files = plain_bytes = stored_bytes = 0
    inference_id = 0
    for g, (endpoint, variant, hour) in enumerate(groups):
        count = records // len(groups) + (1 if g < records % len(groups) else 0)
        if not count:
            continue
        millis = sorted(rng.randrange(3_600_000) for _ in range(count))
        directory = root / endpoint / variant / hour.strftime("%Y/%m/%d/%H")
        directory.mkdir(parents=True, exist_ok=True)
        stamp = hour.strftime("%Y-%m-%dT%H:").encode()
        chunks = math.ceil(count / LINES_PER_FILE)
        for c in range(chunks):
            part = millis[c * count // chunks : (c + 1) * count // chunks]
            lines = []
            for ms in part:
                inference_id += 1
                request, response = pairs[rng.randrange(len(pairs))]
                event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
                when = stamp + b"%02d:%02dZ" % divmod(ms // 1000, 60)
                lines.append(LINE % (request, response, event_id, inference_id, when))
            data = b"".join(lines)
            first = part[0]
            file_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            name = f"{first // 60_000:02d}-{first // 1000 % 60:02d}-{first % 1000:03d}-{file_id}"
            stored = zc.compress(data) if compress else data
            (directory / (name + suffix)).write_bytes(stored)
            files += 1
            plain_bytes += len(data)
            stored_bytes += len(stored)
    return {"records": inference_id, "files": files, "plain_bytes": plain_bytes, "stored_bytes": stored_bytes}


# ---- running one system --------------------------------------------------------------------------


class Run(msgspec.Struct):
    returncode: int
    stdout: bytes
    stdout_lines: int
    stderr: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    timed_out: bool


def run_child(
    cmd: Sequence[str], *, timeout: float, keep_stdout: bool = True, env: dict[str, str] | None = None
) -> Run:
    """Run `cmd`; its stdout (kept, or only its lines counted), wall time, and its own CPU and peak
    RSS (`wait4`: this child alone). Killed after `timeout` seconds."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None
        out = _Drain(proc.stdout, keep_stdout)
        out.start()
        deadline = t0 + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline and not timed_out:
                proc.kill()
                timed_out = True
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.join(30)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return Run(
        returncode=proc.returncode,
        stdout=b"".join(out.chunks),
        stdout_lines=out.lines,
        stderr=stderr[-4000:],
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        timed_out=timed_out,
    )


class _Drain(threading.Thread):
    """Reads a pipe to its end: keeps the bytes, or only counts the lines."""

    def __init__(self, pipe: IO[bytes], keep: bool) -> None:
        super().__init__(daemon=True)
        self.pipe, self.keep = pipe, keep
        self.chunks: list[bytes] = []
        self.lines = 0

    def run(self) -> None:
        with self.pipe:
            while chunk := self.pipe.read1(1 << 20):  # type: ignore[attr-defined]
                self.lines += chunk.count(b"\n")
                if self.keep:
                    self.chunks.append(chunk)


def captured_cmd(root: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "captured", "read", str(root), *(["--stats"] if mode == "stats" else [])]


def duckdb_query(root: Path, compress: bool) -> str:
    glob = f"{root}/**/*.jsonl{'.zst' if compress else ''}"
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in COLUMNS.items()) + "}"
    return QUERY.format(glob=glob, compression="zstd" if compress else "none", columns=columns)


_TOTAL = (
    re.compile(r"^\s*(?:total\s+)?records\s*[:=]?\s*([\d,_]+)\b", re.I | re.M),  # "records: 1,000,000"
    re.compile(r"\b([\d,_]+)\s+records\b", re.I),  # "1,000,000 records in 100 files"
)


def stats_total(text: str) -> int | None:
    """The record total in `captured read --stats` output (its first "records: N" or "N records")."""
    for pattern in _TOTAL:
        if m := pattern.search(text):
            return int(m.group(1).replace(",", "").replace("_", ""))
    return None


def run_captured(root: Path, mode: str, timeout: float) -> dict[str, Any]:
    r = run_child(captured_cmd(root, mode), timeout=timeout, keep_stdout=mode == "stats")
    records = stats_total(r.stdout.decode(errors="replace")) if mode == "stats" else r.stdout_lines
    result = _result(r, records)
    if mode == "stats":
        result["report"] = r.stdout.decode(errors="replace")
    return result


def run_duckdb(query: str, threads: int, timeout: float) -> dict[str, Any]:
    r = run_child([sys.executable, "-c", DUCKDB_CHILD, query, str(threads)], timeout=timeout)
    try:
        out = json.loads(r.stdout.splitlines()[-1])
    except (ValueError, IndexError):
        out = {}
    result = _result(r, out.get("records"))
    result.update({k: out[k] for k in ("rows", "threads", "duckdb") if k in out})
    return result


def _result(r: Run, records: int | None) -> dict[str, Any]:
    return {
        "records": records,
        "returncode": r.returncode,
        "timed_out": r.timed_out,
        "wall_s": r.wall_s,
        "records_per_s": (records or 0) / r.wall_s,
        "cpu_s": r.cpu_s,
        "peak_rss_mb": r.peak_rss_mb,
        "stderr": r.stderr,
    }


# ---- the report ----------------------------------------------------------------------------------


def summarize(system: str, runs: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    ok = all(r["records"] == expected and r["returncode"] == 0 and not r["timed_out"] for r in runs)
    out: dict[str, Any] = {"system": system, "records": runs[0]["records"], "ok": ok}
    out.update({m: statistics.median(r[m] for r in runs) for m in METRICS})
    out["runs"] = [{k: v for k, v in r.items() if k != "report"} for r in runs]
    if "report" in runs[0]:
        out["report"] = runs[0]["report"]
    return out


def format_report(doc: dict[str, Any]) -> str:
    m, p, d = doc["machine"], doc["params"], doc["data"]
    stored = f", {d['stored_bytes'] / 1e6:.0f} MB stored" if p["zstd"] else ""
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"python {m['python']}, captured {m['captured']}, msgspec {m['msgspec']}, duckdb {m['duckdb']} "
        f"(threads: {p['duckdb_threads_used']}) (captured source {m['captured_source']}); {m['date']}",
        f"{d['records']} records in {d['files']} {p['suffix']} files ({d['plain_bytes'] / 1e6:.0f} MB of "
        f"JSON lines{stored}), {len(ENDPOINTS)} endpoints x {len(VARIANTS)} variants x {HOURS} hours; "
        f"median of {p['repeat']} run(s) each, alternating, page cache warm",
        f"captured: {' '.join(p['captured_cmd'])}",
        "",
    ]
    rows: list[Sequence[str]] = [("system", "records", "wall s", "records/s", "CPU s", "peak RSS MB", "ok")]
    for r in doc["results"].values():
        ok = "ok" if r["ok"] else "FAILED"
        rows.append((r["system"], str(r["records"]), f"{r['wall_s']:.2f}", f"{r['records_per_s']:,.0f}",
                     f"{r['cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", ok))  # fmt: skip
    lines += format_table(rows)
    ratios = doc["ratios"]
    lines += [
        "",
        f"captured / duckdb: records/s x{ratios['records_per_s']:.2f}, CPU s x{ratios['cpu_s']:.2f}",
    ]
    for r in doc["results"].values():
        if not r["ok"]:
            last = r["runs"][-1]
            lines.append(f"{r['system']} FAILED: records {last['records']}, exit {last['returncode']}, "
                         f"timed out {last['timed_out']}: {last['stderr'][-600:]}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = args.captured_mode
    workdir = Path(tempfile.mkdtemp(prefix="bench-read-", dir=args.workdir))
    root = workdir / "captures"
    try:
        data = generate(root, args.records, compress=args.zstd)
        query = duckdb_query(root, args.zstd)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for i in range(args.repeat):
            # Each system goes first every other round: neither always runs on a machine the
            # other has just warmed (or left busy).
            for system in SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]:
                if system == "captured":
                    runs["captured"].append(run_captured(root, mode, args.timeout))
                else:
                    runs["duckdb"].append(run_duckdb(query, args.duckdb_threads, args.timeout))
    finally:
        if args.keep:
            print(f"data kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {s: summarize(s, runs[s], args.records) for s in SYSTEMS}
    c, d = results["captured"], results["duckdb"]
    first = runs["duckdb"][0]
    doc = {
        "machine": {**machine(), "duckdb": first.get("duckdb", "?")},
        "params": {
            "records": args.records,
            "repeat": args.repeat,
            "zstd": args.zstd,
            "suffix": ".jsonl.zst" if args.zstd else ".jsonl",
            "captured_mode": mode,
            "captured_cmd": ["python", *captured_cmd(Path("DIR"), mode)[1:]],
            "duckdb_threads": args.duckdb_threads,
            "duckdb_threads_used": first.get("threads", "?"),
            "duckdb_query": query.replace(str(root), "DIR"),
            "seed": SEED,
        },
        "data": data,
        "results": results,
        "ratios": {
            "records_per_s": c["records_per_s"] / d["records_per_s"] if d["records_per_s"] else math.nan,
            "cpu_s": c["cpu_s"] / d["cpu_s"] if d["cpu_s"] else math.nan,
        },
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(doc))
    return 0 if c["ok"] and d["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
