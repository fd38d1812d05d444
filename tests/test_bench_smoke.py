"""The end-to-end benchmark runs at a tiny size and verifies its own output (no timing checks).

Step by step: `bench/ingest.py -n 2000 --senders 1 --s3 --json` starts the `captured` daemon (with a
file destination, then with S3 delivery to a local moto server) and the naive baseline in turn,
pushes 2000 records into each, stops them and counts the lines they wrote (on disk, or in the
bucket). The script must exit 0 and report, for every system, every record received, written and
found.

Every test here runs a script of bench/ and is marked `bench`: the default run leaves them out,
`python -m pytest -m bench` runs them (as .ci/run does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.bench

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
BENCH = BENCH_DIR / "ingest.py"
RECORDS = 2000


def run_bench(script: str, *args: str, timeout: float = 100) -> dict[str, Any]:
    """Run `bench/<script> <args> --json`; it must exit 0; its JSON document."""
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


@pytest.mark.timeout(180)
def test_ingest_bench_runs_and_verifies_every_system() -> None:
    doc = run_bench("ingest.py", "-n", str(RECORDS), "--senders", "1", "--s3", "--no-prewarm", timeout=150)
    assert set(doc["results"]) == {"captured", "captured-s3", "naive"}
    for result in doc["results"].values():
        assert result["ok"], result
        assert result["received"] == RECORDS
        assert result["written"] == RECORDS
        assert result["lines_verified"] == RECORDS
        assert result["sender_retries"] >= 0
    assert set(doc["ratios"]) == set(doc["s3_ratios"]) == {"records_per_s", "cpu_s_per_m"}


@pytest.mark.timeout(120)
def test_client_overhead_bench_runs_all_scenarios() -> None:
    """`bench/client_overhead.py -n 2000 --json` times capture() with the daemon healthy, absent and
    stalled (SIGSTOP/SIGCONT), and must exit 0 with 2000 timed calls in each scenario. No timings
    are checked.
    """
    doc = run_bench("client_overhead.py", "-n", str(RECORDS))
    for name in ("healthy", "absent", "stalled"):
        result = doc["results"][name]
        assert result["calls"] == RECORDS, name
        assert result["ok"], result
    assert doc["results"]["stalled"]["flushed"] is True


@pytest.mark.timeout(120)
def test_upload_bench_runs_and_verifies_both_systems() -> None:
    """`bench/upload.py --files 2 --size-mb 6 --json` uploads two 6 MiB files to a local moto server
    with captured's uploader and with boto3's upload_file, and must exit 0 with every object found
    (count and size) for both. No timings are checked.
    """
    doc = run_bench("upload.py", "--files", "2", "--size-mb", "6")
    assert set(doc["results"]) == {"captured", "boto3"}
    for result in doc["results"].values():
        assert result["ok"], result
        assert result["objects_verified"] == 2
        assert result["files"] == 2
    assert set(doc["ratios"]) == {"mb_per_s", "cpu_s_per_gb"}


@pytest.mark.timeout(120)
def test_stage_bench_runs_every_stage() -> None:
    """`bench/stages.py --records 200 --repeat 2 --json`: every stage and its baseline run on the
    seeded batch (the stages assert their own outputs' shapes). No timings are checked."""
    doc = run_bench("stages.py", "--records", "200", "--repeat", "2")
    names = [r["stage"] for r in doc["results"]]
    assert names == [
        "client encode",
        "frame decode",
        "sampling 10 %",
        "encode",
        "encode, by record",
        "spool write",
        "pipeline",
    ]
    assert all(r["ns_per_record"] > 0 and r["baseline_ns_per_record"] > 0 for r in doc["results"])


def test_spool_write_bench_runs_both_modes(tmp_path: Path) -> None:
    """`bench/spool_write.py --mib 8 --rounds 2 --json`: both modes write through the real Spool
    and report; no timings are checked."""
    doc = run_bench(
        "spool_write.py", "--mib", "8", "--file-mib", "2", "--rounds", "2", "--dir", str(tmp_path)
    )
    assert [r["mode"] for r in doc["results"]] == ["reserve ahead", "no reservation"]
    assert all(len(r["runs"]) == 2 for r in doc["results"])
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.timeout(120)
def test_ingest_bench_with_the_s3_sink() -> None:
    """`bench/ingest.py --s3 --s3-server sink`: captured delivers to captured.testing.s3sink, and every line
    is found again in that server's bucket."""
    args = ["-n", str(RECORDS), "--senders", "1", "--only", "captured", "--s3", "--s3-server", "sink"]
    doc = run_bench("ingest.py", *args, "--no-prewarm")
    assert doc["params"]["s3_server"] == "sink"
    result = doc["results"]["captured-s3"]
    assert result["ok"] and result["lines_verified"] == RECORDS, result


@pytest.mark.timeout(120)
def test_ingest_bench_with_several_endpoints_and_zstd() -> None:
    """`bench/ingest.py --endpoints 2 --compression zstd`: captured with two endpoints (a sender
    each) and captured delivering .jsonl.zst run beside captured; every line is found again, the
    compressed outputs decompressed, and the compression's cost is measured on them."""
    args = [
        "-n",
        str(RECORDS),
        "--senders",
        "2",
        "--only",
        "captured",
        "--endpoints",
        "2",
        "--compression",
        "zstd",
    ]
    doc = run_bench("ingest.py", *args, "--no-prewarm")
    assert set(doc["results"]) == {"captured", "captured-endpoints", "captured-zstd"}
    for result in doc["results"].values():
        assert result["ok"] and result["lines_verified"] == RECORDS, result
    z = doc["results"]["captured-zstd"]["compression"]
    assert z["ratio"] > 1 and z["plain_bytes"] > z["compressed_bytes"] > 0
    assert set(doc["endpoints_ratios"]) == set(doc["zstd_ratios"]) == {"records_per_s", "cpu_s_per_m"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["sync", "async"])
def test_paced_bench_runs_and_every_record_arrives(client: str) -> None:
    doc = run_bench("paced.py", "--rates", "200", "--seconds", "0.5", "--repeat", "1", "--client", client)
    (result,) = doc["results"]
    assert result["ok"], result
    assert result["rate"] == 200


@pytest.mark.timeout(120)
def test_read_bench_counts_every_record_in_both_systems(tmp_path: Path) -> None:
    """`bench/read.py -n 2000 --repeat 1 --json` writes 2000 seeded records as capture files, then
    runs `captured read DIR --stats` and the DuckDB query over them; it must exit 0, both systems
    must have counted every record, and the data must be gone. No timings are checked."""
    doc = run_bench("read.py", "-n", str(RECORDS), "--repeat", "1", "--workdir", str(tmp_path))
    assert doc["data"]["records"] == RECORDS
    assert set(doc["results"]) == {"captured", "duckdb"}
    for result in doc["results"].values():
        assert result["ok"], result
        assert result["records"] == RECORDS
    assert set(doc["ratios"]) == {"records_per_s", "cpu_s"}
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.timeout(180)
def test_read_s3_bench_counts_every_record_in_both_arms() -> None:
    """`bench/read_s3.py -n 2000 --repeat 1 --json` uploads 2000 seeded records to a moto server,
    then runs `captured read s3://... --stats` with one worker and with two: both must count every
    record. No timings are checked."""
    doc = run_bench("read_s3.py", "-n", str(RECORDS), "--repeat", "1", "--workers", "2")
    assert doc["data"]["records"] == RECORDS
    assert set(doc["results"]) == {"1 worker", "2 workers"}
    for result in doc["results"].values():
        assert result["ok"], result
        assert result["records"] == RECORDS
    assert set(doc["ratios"]) == {"records_per_s", "cpu_s"}
