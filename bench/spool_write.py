"""Spool write: what reserving disk ahead of the writes saves the kernel.

Writes `--mib` of SageMaker lines through `captured.daemon.spool.Spool` (rotation at `--file-mib`, every
file flushed and sealed as the daemon does it) twice per round: with disk reserved ahead of the
writes (`fallocate(FALLOC_FL_KEEP_SIZE)`, the daemon's default) and without, the baseline. Rounds
alternate the order; the table gives the median CPU seconds (user + system, this process) per GiB
and the ratio to the baseline. The chunk is one encoded batch: `--chunk-kib` (default 830, 1,400
lines of ~600 bytes, what one client batch of 250-byte records becomes).

    python bench/spool_write.py                  # 1024 MiB per mode, 5 rounds
    python bench/spool_write.py --chunk-kib 270  # 8 KiB records: ~32 lines of 8.4 KB per batch
    python bench/spool_write.py --dir /var/lib/captured/bench --json

Run it on the filesystem the spool will live on (`--dir`): the saving is the filesystem's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from captured.daemon.spool import Spool
from captured.service.daemon import tune_malloc
from captured.service.settings import SpoolConfig

MODES = ("reserve ahead", "no reservation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Spool writes with and without disk reserved ahead")
    p.add_argument("--mib", type=int, default=1024, help="MiB written per mode and round (default 1024)")
    p.add_argument("--chunk-kib", type=int, default=830, help="bytes per write, in KiB (default 830)")
    p.add_argument("--file-mib", type=int, default=64, help="max_file_bytes, in MiB (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    p.add_argument("--dir", help="where to write (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if min(args.mib, args.chunk_kib, args.file_mib, args.rounds) < 1:
        p.error("sizes and --rounds must be positive")
    return args


def chunk_of_lines(size: int) -> bytes:
    """`size` bytes (about) of whole, distinct JSON lines."""
    line = b'{"captureData":{"endpointInput":{"data":"%s"}},"eventVersion":"0"}\n'
    filler = b"0123456789," * 50
    out = bytearray()
    i = 0
    while len(out) < size:
        out += line % (b"%d," % i + filler)
        i += 1
    return bytes(out)


def write_once(directory: Path, chunk: bytes, total: int, file_bytes: int, reserve_ahead: bool) -> float:
    """CPU seconds to write `total` bytes through a Spool and seal every file."""
    target = directory / ("reserve" if reserve_ahead else "plain")
    target.mkdir()
    cfg = SpoolConfig(max_file_bytes=file_bytes, fsync_interval_s=0)
    spool = Spool(str(target), cfg, lambda p, s: None, reserve_ahead=reserve_ahead)
    now = time.time()
    hour = int(now) // 3600
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    written = 0
    while written < total:
        spool.write("bench", "AllTraffic", hour, now, chunk)
        written += len(chunk)
    spool.seal_all()  # fdatasync, give back what was reserved past the end, rename
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(target)
    return (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()
    chunk = chunk_of_lines(args.chunk_kib * 1024)
    total = args.mib * 1024 * 1024
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-spool-"))
    work = Path(tempfile.mkdtemp(prefix="spool-write-", dir=base))
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                cpu = write_once(work, chunk, total, args.file_mib * 1024 * 1024, mode == MODES[0])
                runs[mode].append(cpu * 1024 * 1024 * 1024 / total)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    baseline = statistics.median(runs[MODES[1]])
    results = [
        {
            "mode": mode,
            "cpu_s_per_gib": statistics.median(v),
            "runs": v,
            "ratio": statistics.median(v) / baseline if baseline else 0.0,
        }
        for mode, v in runs.items()
    ]
    params = {k: getattr(args, k) for k in ("mib", "chunk_kib", "file_mib", "rounds")}
    doc: dict[str, Any] = {"params": params, "results": results}
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0


def format_report(doc: dict[str, Any]) -> str:
    p = doc["params"]
    out = [
        f"{p['mib']} MiB per mode in {p['chunk_kib']} KiB writes, {p['file_mib']} MiB files, "
        f"median of {p['rounds']} rounds",
        "",
        f"{'mode':<15} | CPU s per GiB | x baseline | runs",
        f"{'-' * 15}-+---------------+------------+-----",
    ]
    for r in doc["results"]:
        runs = ", ".join(f"{x:.3f}" for x in r["runs"])
        out.append(f"{r['mode']:<15} | {r['cpu_s_per_gib']:<13.3f} | x{r['ratio']:<9.2f} | {runs}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
