"""S3 upload benchmark: captured's uploader against boto3's `upload_file` (s3transfer), same server.

One moto server on loopback (captured.testing.s3.MotoServer) and one set of files of JSON-lines
data. Each round uploads the same files twice, the bucket emptied (server reset) in between:

* captured: what the daemon runs, `Delivery(S3Uploader(...), workers=4)` with the default
  `S3Config` (multipart from 16 MiB, 8 MiB parts, 8 parts in flight across all files), in
  `uvloop.run`, on copies of the files (Delivery deletes each file once S3 has it). The uploads
  run in the uploader child process (`captured/uploader.py`), started before the clock;
* boto3: `client.upload_file` with `TransferConfig(multipart_threshold=16 MiB,
  multipart_chunksize=8 MiB, max_concurrency=8)`, four files at a time in a ThreadPoolExecutor,
  with the same unsigned payload and CRC32 checksums.

CPU is this process's `time.process_time()` over each phase, plus, for captured, the uploader
process's CPU time over the same phase (the moto server is another process and not counted).
After each phase every object is checked with `head_object` (count and size).

    python bench/upload.py                          # 8 files x 64 MiB
    python bench/upload.py --files 16 --size-mb 32 --repeat 3
    python bench/upload.py --files 2 --size-mb 6 --json
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
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Dummy credentials before any client exists; never probe instance metadata or ~/.aws.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    NO_PROXY="127.0.0.1,localhost",
    no_proxy="127.0.0.1,localhost",
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)

import aiobotocore.session  # noqa: E402, F401  (imported before any clock starts)
import psutil  # noqa: E402
import uvloop  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402
from ingest import machine  # noqa: E402

from captured.daemon.spool import object_key  # noqa: E402
from captured.delivery.queue import Delivery  # noqa: E402
from captured.delivery.uploader import S3Uploader  # noqa: E402
from captured.service.settings import S3Config  # noqa: E402
from captured.testing.delivery import running  # noqa: E402
from captured.testing.s3 import MotoServer  # noqa: E402

MIB = 1024 * 1024
MB = 1_000_000
GB = 1_000_000_000
BUCKET = "bench-upload"
PREFIX = "captures"
SYSTEMS = ("captured", "boto3")
FILE_WORKERS = 4
DRAIN_TIMEOUT_S = 600.0
METRICS = ("wall_s", "mb_per_s", "cpu_s", "cpu_s_per_gb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="captured's S3 uploader vs boto3 upload_file on a local moto")
    p.add_argument("--files", type=int, default=8, help="files per phase (default 8)")
    p.add_argument("--size-mb", type=int, default=64, help="size of each file in MiB (default 64)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    if args.files < 1 or args.size_mb < 1 or args.repeat < 1:
        p.error("--files, --size-mb and --repeat must be positive")
    return args


def make_files(directory: Path, count: int, size: int) -> list[Path]:
    """`count` sealed-spool-named files of `size` bytes of JSON lines (each file different)."""
    paths = []
    for i in range(count):
        lines = []
        n = 0
        while n < MIB:
            line = (
                '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
                f'"data":"{i},{n},{uuid.uuid4().hex}","encoding":"CSV"}},"endpointOutput":{{'
                f'"observedContentType":"text/csv","mode":"OUTPUT","data":"0.{n % 997}","encoding":"CSV"}}}},'
                f'"eventMetadata":{{"eventId":"{uuid.uuid4()}","inferenceTime":"2026-11-24T10:00:00Z"}},'
                '"eventVersion":"0"}\n'
            )
            lines.append(line)
            n += len(line)
        block = "".join(lines).encode()
        name = f"bench-endpoint.AllTraffic.2026-11-24-10.00-00-{i:03d}-{uuid.uuid4()}.jsonl"
        path = directory / name
        with open(path, "wb") as fh:
            left = size
            while left > 0:
                left -= fh.write(block[:left])
        paths.append(path)
    return paths


def verify(client: Any, paths: list[Path], size: int) -> dict[str, Any]:
    """Every file is in the bucket with its size, and nothing else is."""
    found = 0
    for path in paths:
        head = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{object_key(path.name)}")
        found += head["ContentLength"] == size
    listed = client.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    return {"objects_verified": found, "objects_listed": listed, "ok": found == listed == len(paths)}


def fresh_bucket(server: MotoServer) -> Any:
    server.reset()
    client = server.boto3_client()
    client.create_bucket(Bucket=BUCKET)
    return client


def run_captured(server: MotoServer, paths: list[Path], workdir: Path) -> dict[str, Any]:
    spool = workdir / "spool"
    spool.mkdir()
    copies = []
    for path in paths:
        copies.append(spool / path.name)
        shutil.copyfile(path, copies[-1])
    cfg = S3Config(endpoint_url=server.endpoint_url, region="us-east-1")

    async def main() -> dict[str, Any]:
        destination = S3Uploader(f"s3://{BUCKET}/{PREFIX}", cfg)
        await destination.start()
        assert destination.pid is not None
        child = psutil.Process(destination.pid)
        delivery = Delivery(destination, workers=FILE_WORKERS)
        async with running(delivery, own_prefix=f"{PREFIX}-none/"):  # nothing to tidy there
            cpu0, child0, t0 = time.process_time(), child_cpu(child), time.perf_counter()
            for copy in copies:
                delivery.submit(str(copy), copy.stat().st_size)
            drained = await delivery.drain(DRAIN_TIMEOUT_S)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0 + child_cpu(child) - child0
        stats = delivery.statistics()
        return {"wall_s": wall, "cpu_s": cpu, "drained": drained, "retries": stats.retries,
                "failures": stats.failures}  # fmt: skip

    try:
        return uvloop.run(main())
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def child_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def run_boto3(server: MotoServer, paths: list[Path]) -> dict[str, Any]:
    config = Config(
        region_name="us-east-1",
        retries={"total_max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=8 + FILE_WORKERS,
        s3={"payload_signing_enabled": False},  # as captured's uploader: the CRC32 checksum covers the body
    )
    client = server.boto3_client(config=config)
    transfer = TransferConfig(multipart_threshold=16 * MIB, multipart_chunksize=8 * MIB, max_concurrency=8)

    def one(path: Path) -> None:
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{object_key(path.name)}", Config=transfer)

    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(FILE_WORKERS) as pool:
        list(pool.map(one, paths))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "drained": True, "retries": 0, "failures": {}}


def one_round(server: MotoServer, system: str, paths: list[Path], size: int, workdir: Path) -> dict[str, Any]:
    client = fresh_bucket(server)
    r = run_captured(server, paths, workdir) if system == "captured" else run_boto3(server, paths)
    total = size * len(paths)
    r.update(verify(client, paths, size))
    r["ok"] = r["ok"] and r["drained"]
    r["mb_per_s"] = total / MB / r["wall_s"]
    r["cpu_s_per_gb"] = r["cpu_s"] / (total / GB)
    return r


def summarize(system: str, runs: list[dict[str, Any]], files: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "files": files, "mb": files * size / MB}
    for m in METRICS:
        out[m] = statistics.median(r[m] for r in runs)
    out["ok"] = all(r["ok"] for r in runs)
    out["objects_verified"] = min(r["objects_verified"] for r in runs)
    out["retries"] = sum(r["retries"] for r in runs)
    out["runs"] = runs
    return out


def versions() -> dict[str, str]:
    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {n: ver(n) for n in ("boto3", "botocore", "s3transfer", "aiobotocore", "aiohttp", "moto")}


def format_report(doc: dict[str, Any]) -> str:
    m, p, v = doc["machine"], doc["params"], doc["versions"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"python {m['python']}, captured {m['captured']} (source {m['captured_source']}), "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + f"; {m['date']}",
        f"{p['files']} files x {p['size_mib']} MiB, moto server on loopback, "
        f"median of {p['repeat']} round(s)",
        "",
    ]
    head = ("system", "files", "MB", "wall s", "MB/s", "CPU s", "CPU s per GB", "verified")
    rows = [head]
    for r in doc["results"].values():
        verified = f"{r['objects_verified']}/{r['files']} {'ok' if r['ok'] else 'FAILED'}"
        cells = (f"{r['mb']:.0f}", f"{r['wall_s']:.2f}", f"{r['mb_per_s']:.1f}", f"{r['cpu_s']:.2f}")
        rows.append((r["system"], str(r["files"]), *cells, f"{r['cpu_s_per_gb']:.2f}", verified))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    rat = doc["ratios"]
    lines.append("")
    lines.append(
        f"captured / boto3: MB/s x{rat['mb_per_s']:.2f} (target >= 1), "
        f"CPU s per GB x{rat['cpu_s_per_gb']:.2f} (target <= 1)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.size_mb * MIB
    workdir = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    server = MotoServer(max_lifetime=1800.0)
    try:
        src = workdir / "files"
        src.mkdir()
        paths = make_files(src, args.files, size)
        server.start()
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for _ in range(args.repeat):
            for system in SYSTEMS:
                runs[system].append(one_round(server, system, paths, size, workdir))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {s: summarize(s, runs[s], args.files, size) for s in SYSTEMS}
    c, b = results["captured"], results["boto3"]
    doc = {
        "machine": machine(),
        "versions": versions(),
        "params": {
            "files": args.files,
            "size_mib": args.size_mb,
            "repeat": args.repeat,
            "file_workers": FILE_WORKERS,
            "multipart_threshold_mib": 16,
            "part_mib": 8,
            "parts_in_flight": 8,
        },
        "results": results,
        "ratios": {
            "mb_per_s": c["mb_per_s"] / b["mb_per_s"],
            "cpu_s_per_gb": c["cpu_s_per_gb"] / b["cpu_s_per_gb"],
        },
    }
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
