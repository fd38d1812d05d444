"""`captured read --stats` over S3: one process against worker processes, in one run.

The records of `bench/read.py` (same generator, same seed) are uploaded to a moto S3 server on
127.0.0.1 (the test extra's; not timed), then, alternating (each arm first every other round),
`--repeat` times, each in a fresh subprocess:

- 1 worker: `python -m captured read s3://BUCKET/capture --stats --workers 1`: one process lists,
  downloads four objects ahead on a background thread and counts.
- N workers: the same with `--workers N` (default: the CPUs, at most 4): N spawned processes,
  each downloading and counting its own run of objects.

Columns as in `bench/read.py` (CPU s: the command and its workers, from `wait4`), plus the moto
server's CPU during the run (it shares this machine's cores; a real S3 does not), and the ratio
N workers / 1 worker. Both arms must count `-n` records. DuckDB is not run: reading S3 needs its
httpfs extension, which it downloads.

    python bench/read_s3.py                 # 1,000,000 records, 3 runs each
    python bench/read_s3.py -n 200000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from ingest import format_table, machine
from read import generate, run_child, stats_total

from captured.reader.batch import MAX_WORKERS
from captured.testing.s3 import REGION, MotoServer

BUCKET = "bench-read-s3"
PREFIX = "capture"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="captured read --stats over S3: 1 worker against N")
    p.add_argument("-n", "--records", type=int, default=1_000_000, help="records to write (default 1000000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per arm, alternating (default 3)")
    p.add_argument(
        "--workers", type=int, default=min(os.cpu_count() or 1, MAX_WORKERS), help="N (default: CPUs)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take before it fails")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if args.records < 1 or args.repeat < 1 or args.workers < 2:
        p.error("--records and --repeat must be at least 1, --workers at least 2")
    return args


def run_arm(server: MotoServer, workers: int, timeout: float) -> dict[str, Any]:
    moto = psutil.Process(server.proc.pid)
    before = sum(moto.cpu_times()[:2])
    cmd = [sys.executable, "-m", "captured", "read", f"s3://{BUCKET}/{PREFIX}", "--stats",
           "--workers", str(workers), "--endpoint-url", server.endpoint_url, "--region", REGION]  # fmt: skip
    r = run_child(cmd, timeout=timeout, env=server.aws_env())  # dummy credentials, no proxies
    records = stats_total(r.stdout.decode(errors="replace"))
    return {
        "records": records,
        "ok": r.returncode == 0 and not r.timed_out,
        "wall_s": r.wall_s,
        "records_per_s": (records or 0) / r.wall_s,
        "cpu_s": r.cpu_s,
        "moto_cpu_s": sum(moto.cpu_times()[:2]) - before,
        "stderr": r.stderr,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-read-s3-"))
    arms = {"1 worker": 1, f"{args.workers} workers": args.workers}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    try:
        data = generate(workdir, args.records, compress=False)
        with MotoServer() as server:
            client = server.boto3_client()
            client.create_bucket(Bucket=BUCKET)
            for path in sorted(workdir.rglob("*.jsonl")):
                client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(workdir)}")
            for i in range(args.repeat):
                for name in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                    runs[name].append(run_arm(server, arms[name], args.timeout))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        results[name] = {
            "records": rs[0]["records"],
            "ok": all(r["ok"] and r["records"] == args.records for r in rs),
            **{
                k: statistics.median(r[k] for r in rs)
                for k in ("wall_s", "records_per_s", "cpu_s", "moto_cpu_s")
            },
        }
        if not results[name]["ok"]:
            print(f"{name} FAILED: {rs[-1]['stderr'][-600:]}", file=sys.stderr)
    one, many = results["1 worker"], results[f"{args.workers} workers"]
    ratios = {k: many[k] / one[k] if one[k] else math.nan for k in ("records_per_s", "cpu_s")}
    doc = {"machine": machine(), "data": data, "repeat": args.repeat, "results": results, "ratios": ratios}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(doc, args.workers))
    return 0 if all(r["ok"] for r in results.values()) else 1


def format_report(doc: dict[str, Any], workers: int) -> str:
    m, data = doc["machine"], doc["data"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; python {m['python']}, captured "
        f"{m['captured']} (source {m['captured_source']}); {m['date']}",
        f"{data['records']} records in {data['files']} .jsonl objects ({data['plain_bytes'] / 1e6:.0f} MB) "
        f"on a moto server on 127.0.0.1; median of {doc['repeat']} run(s) each, alternating",
        "",
    ]
    rows = [("arm", "records", "wall s", "records/s", "CPU s", "moto CPU s", "ok")]
    for name, x in doc["results"].items():
        ok = "ok" if x["ok"] else "FAILED"
        rows.append((name, str(x["records"]), f"{x['wall_s']:.2f}", f"{x['records_per_s']:,.0f}",
                     f"{x['cpu_s']:.2f}", f"{x['moto_cpu_s']:.2f}", ok))  # fmt: skip
    lines += format_table(rows)
    r = doc["ratios"]
    lines += [
        "",
        f"{workers} workers / 1 worker: records/s x{r['records_per_s']:.2f}, CPU s x{r['cpu_s']:.2f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
