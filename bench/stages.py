"""Stage micro-benchmarks: each step of the hot path alone, in this process, on one batch.

So that a regression in `bench/ingest.py` can be located. Each stage runs on the same seeded
batch (`captured/testing/data.py`, ~250-byte CSV requests by default) and is timed as the median of `--repeat`
runs; beside it, a baseline doing the same job the obvious way with the standard library:

  client encode  prepare_record + batch_frames (what CaptureClient does per record)
                 vs json.dumps of a dict per record
  frame decode   msgspec decode of one BATCH payload into Record structs
                 vs json.loads of the same records as JSON lines
  sampling 10 %  raw split + sampling + decoding the kept records (the daemon below 100 %)
                 vs full decode, then sampling
  encode         LineEncoder.encode_uniform: SageMaker JSON lines, column by column (what the
                 pipeline does with a uniform batch, i.e. one model server's)
                 vs building each line's dict and json.dumps
  encode, by record  LineEncoder.group_lines + encode: the path for mixed batches, same baseline
  spool write    Spool.write of the encoded group (one os.write per group)
                 vs one write per line to a file
  pipeline       Pipeline.process of one BATCH payload (decode, sample, encode, write)
                 vs the sum of the json baselines above

    python bench/stages.py                    # 1,400 records per batch, median of 9
    python bench/stages.py --payload 8k --records 60 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from captured.client.record import batch_frames, prepare_record
from captured.daemon.encode import LineEncoder
from captured.daemon.pipeline import Pipeline
from captured.daemon.sample import sample
from captured.daemon.spool import Spool
from captured.daemon.watermark import CaptureGate, Usage
from captured.service.config import Config
from captured.service.daemon import tune_malloc
from captured.service.datacapture import CaptureContentTypeHeader, CaptureOption, DataCaptureConfig
from captured.service.settings import SpoolConfig
from captured.testing.data import PAYLOAD_SIZES, payloads
from captured.wire import frames

DCC = DataCaptureConfig(
    InitialSamplingPercentage=100,
    DestinationS3Uri="file:///unused",
    CaptureOptions=(CaptureOption("Input"), CaptureOption("Output")),
    CaptureContentTypeHeader=CaptureContentTypeHeader(("text/csv",), ("application/json",)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="captured's hot path, stage by stage, against stdlib baselines")
    p.add_argument("--records", type=int, default=1400, help="records per batch (default 1400, ~512 KiB)")
    p.add_argument("--payload", choices=sorted(PAYLOAD_SIZES), default="250", help="request body size")
    p.add_argument("--repeat", type=int, default=9, help="timed runs per stage; the median is reported")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if args.records < 1 or args.repeat < 1:
        p.error("--records and --repeat must be positive")
    return args


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs, after one warm-up run."""
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()  # the daemon's allocator settings, or large buffers page-fault on every run
    n = args.records
    pairs = payloads(n, seed=1, size=PAYLOAD_SIZES[args.payload])
    now = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    try:
        results = run_stages(args, pairs, now, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"params": {"records": n, "payload": args.payload, "repeat": args.repeat}, "results": results}
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0


def run_stages(
    args: argparse.Namespace, pairs: list[tuple[bytes, bytes]], now: float, tmp: Path
) -> list[dict[str, Any]]:
    n = args.records
    r = args.repeat
    mib = 6 * 1024 * 1024

    # -- client encode
    def client_encode() -> list[tuple[bytes, int]]:
        prepared = [
            prepare_record(q, a, "text/csv", "text/csv", None, None, None, None, now, mib) for q, a in pairs
        ]
        return batch_frames([p for p, _ in prepared], [s for _, s in prepared], 512 * 1024)

    def client_json() -> list[str]:
        return [
            json.dumps(
                {
                    "request": q.decode(),
                    "response": a.decode(),
                    "request_content_type": "text/csv",
                    "response_content_type": "text/csv",
                    "time": now,
                }
            )
            for q, a in pairs
        ]

    (frame, count), *_ = client_encode()
    assert count == n, "one batch per run: raise the batch size or lower --records"
    payload = memoryview(frame)[frames.HEADER_SIZE :]
    json_lines = "\n".join(client_json()).encode()

    # -- decode
    def decode() -> list[frames.Record]:
        return frames.batch_decoder.decode(payload)

    def decode_json() -> list[Any]:
        return [json.loads(line) for line in json_lines.splitlines()]

    records = decode()

    # -- sampling at 10 %
    def sample_raw() -> list[frames.Record]:
        kept = sample(frames.raw_list_decoder.decode(payload), 10)
        return [frames.record_decoder.decode(k) for k in kept]

    def sample_full() -> list[frames.Record]:
        return sample(frames.batch_decoder.decode(payload), 10)

    # -- encode
    enc = LineEncoder(DCC)

    def encode() -> bytes:
        uniform = enc.encode_uniform(records, "AllTraffic", lambda v: True)
        assert uniform is not None, "the bench batch is uniform: one model server's records"
        return uniform.data

    def encode_records() -> list[bytes]:
        groups, _, _, _ = enc.group_lines(records, "AllTraffic", lambda v: True)
        return [enc.encode(g.lines) for g in groups.values()]

    def encode_json() -> bytes:
        out = []
        for rec in records:
            t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.inference_time))
            doc = {
                "captureData": {
                    "endpointInput": {
                        "observedContentType": rec.request_content_type,
                        "mode": "INPUT",
                        "data": rec.request.decode(),
                        "encoding": "CSV",
                    },
                    "endpointOutput": {
                        "observedContentType": rec.response_content_type,
                        "mode": "OUTPUT",
                        "data": rec.response.decode(),
                        "encoding": "CSV",
                    },
                },
                "eventMetadata": {"eventId": str(uuid.uuid4()), "inferenceTime": t},
                "eventVersion": "0",
            }
            out.append(json.dumps(doc, separators=(",", ":")))
        return ("\n".join(out) + "\n").encode()

    encoded = encode()
    lines = encoded.splitlines(keepends=True)

    # -- spool write
    spool_dir = tmp / "spool"
    spool = Spool(
        str(spool_dir), SpoolConfig(max_file_bytes=5 * 2**30, fsync_interval_s=0), lambda p, s: None
    )
    hour = int(now) // 3600

    def spool_write() -> None:
        spool.write("bench", "AllTraffic", hour, now, encoded)

    line_file = open(tmp / "lines.jsonl", "wb", buffering=0)  # noqa: SIM115 - closed below

    def write_lines() -> None:
        for line in lines:
            line_file.write(line)

    # -- the whole pipeline, no socket
    cfg = msgspec.convert(
        {
            "endpoint_name": "bench",
            "variant_name": "AllTraffic",
            "socket_path": str(tmp / "s.sock"),
            "spool_dir": str(tmp / "pipe"),
            "DataCaptureConfig": msgspec.to_builtins(DCC),
            "spool": {"max_file_bytes": 5 * 2**30, "fsync_interval_s": 0},
        },
        Config,
    )
    pipe_spool = Spool(cfg.spool_dir, cfg.spool, lambda p, s: None)
    gate = CaptureGate(cfg.spool_dir, cfg.watermark, usage=lambda p: Usage(100, 1, 99, 1.0))
    pipeline = Pipeline(cfg, pipe_spool, gate)

    def pipeline_process() -> int:
        return pipeline.process(payload)

    def pipeline_json() -> None:
        decode_json()
        encode_json()
        write_lines()

    stages = [
        ("client encode", client_encode, client_json),
        ("frame decode", decode, decode_json),
        ("sampling 10 %", sample_raw, sample_full),
        ("encode", encode, encode_json),
        ("encode, by record", encode_records, encode_json),
        ("spool write", spool_write, write_lines),
        ("pipeline", pipeline_process, pipeline_json),
    ]
    out = []
    try:
        for name, ours, base in stages:
            t_ours, t_base = timed(ours, r), timed(base, r)
            out.append({
                "stage": name,
                "ns_per_record": t_ours / n * 1e9,
                "baseline_ns_per_record": t_base / n * 1e9,
                "records_per_s": n / t_ours,
                "speedup": t_base / t_ours,
            })  # fmt: skip
    finally:
        line_file.close()
        spool.seal_all()
        pipe_spool.seal_all()
    assert os.path.getsize(tmp / "lines.jsonl") > 0
    return out


def format_report(doc: dict[str, Any]) -> str:
    p = doc["params"]
    head = ("stage", "ns / record", "records/s", "baseline ns / record", "x faster")
    rows = [head]
    for r in doc["results"]:
        rows.append((r["stage"], f"{r['ns_per_record']:.0f}", f"{r['records_per_s']:,.0f}",
                     f"{r['baseline_ns_per_record']:.0f}", f"{r['speedup']:.1f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"{p['records']} records per batch, {p['payload']} B payloads, median of {p['repeat']} runs", ""]
    for i, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
