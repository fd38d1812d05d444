"""`captured.reader.lint` and `report`: the statistics and the problems of `captured read --stats`
and `--validate`, on real trees read by the real reader (SageMaker's sample lines and lines as the
daemon writes them).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import pty
import re
import sys
import threading
import uuid
from pathlib import Path

import msgspec
import pytest
import zstandard

from captured.daemon.encode import CaptureData, EventMetadata, Line
from captured.daemon.encode import Side as LineSide
from captured.reader import batch
from captured.reader import cli as reader_cli
from captured.reader.layout import Place, Selection
from captured.reader.lint import EXAMPLES, MAX_CONTENT_TYPES, SizeHistogram, Stats, outside_reason
from captured.reader.records import Capture, Side
from captured.reader.report import (
    DESCRIPTIONS,
    PROBLEMS,
    ProblemCount,
    Report,
    Sizes,
    format_problems,
    format_report,
)
from captured.reader.sources import FileRef, open_source
from captured.reader.stream import captures, selection
from captured.service import cli as service_cli
from captured.testing.data import SAMPLE_CSV, SAMPLE_HTML, SAMPLE_JSON, SAMPLE_JSONLINES

_encode = msgspec.json.Encoder().encode


def side(mode: str, content_type: str | None, data: str | bytes, encoding: str) -> LineSide:
    """A side as the daemon writes it: `data` str for CSV/JSON, bytes for BASE64."""
    return LineSide(observedContentType=content_type, mode=mode, data=data, encoding=encoding)


def line(
    when: str,
    inp: LineSide | None = None,
    out: LineSide | None = None,
    *,
    inference_id: str | None = None,
) -> bytes:
    """One capture line, byte for byte as the daemon writes it (its own line structs)."""
    meta = EventMetadata(eventId=str(uuid.uuid4()), inferenceId=inference_id, inferenceTime=when)
    return _encode(Line(captureData=CaptureData(endpointInput=inp, endpointOutput=out), eventMetadata=meta))


def csv_record(when: str, body: str, answer: str) -> bytes:
    return line(
        when,
        side("INPUT", "text/csv", body, "CSV"),
        side("OUTPUT", "text/csv; charset=utf-8", answer, "CSV"),
    )


def json_record(when: str, body: str, answer: str) -> bytes:
    return line(
        when,
        side("INPUT", "application/json", body, "JSON"),
        side("OUTPUT", "application/json", answer, "JSON"),
    )


def capture_file(root: Path, endpoint: str, variant: str, hour: str, name: str = "00-00-000") -> Path:
    """The path of a capture file of the layout: `hour` is `yyyy/mm/dd/hh`."""
    path = root / endpoint / variant / hour / f"{name}-{uuid.uuid4()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_lines(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return str(path)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(data)


def run(root: Path, sel: Selection) -> Report:
    """The real read of `root` through `Stats`, record by record, and the same read a block at a
    time as `captured read --stats` does it (`batch`), in one process and split over two and
    three: the reports must be equal."""
    source = open_source(str(root))
    listing = source.listing(sel)
    stats = Stats(sel)
    stats.listing(listing)
    for c in captures(source, listing, sel, stats.on_problem):
        stats.add(c)
    for workers in (1, 2, 3):  # one process, and the files split over worker processes
        blocks = Stats(sel)
        blocks.listing(listing)
        batch.count(source, listing, blocks, workers=workers)
        assert blocks.report() == stats.report(), workers
    return stats.report()


def problem(report: Report, kind: str) -> ProblemCount:
    assert kind in report.problems, f"{kind} not reported: {sorted(report.problems)}"
    return report.problems[kind]


def assert_printed(text: str, report: Report) -> None:
    """Each problem of `report` is in `text` with its count and its examples."""
    for kind, p in report.problems.items():
        assert re.search(rf"^  {kind} +{p.count}  ", text, re.MULTILINE), (kind, text)
        for key in p.examples:
            assert f"      {key}" in text


# -- a tree seeded with every problem -----------------------------------------------------------


class Seeded:
    """A tree with each problem kind; keys of the interesting lines and files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        a = capture_file(root, "churn", "AllTraffic", "2024/06/01/12", "00-01-000")
        html = "<html><body>hello</body></html>"
        self.a = write_lines(
            a,
            [
                csv_record("2024-06-01T12:00:01Z", "1,2,3\n", "0.5"),
                # 2: input CSV, output JSON.
                line(
                    "2024-06-01T12:00:02Z",
                    side("INPUT", "text/csv", "4,5,6\n", "CSV"),
                    side("OUTPUT", "application/json", '{"score": 0.5}', "JSON"),
                ),
                # 3: cut short.
                b'{"captureData":{"endpointInput":{"observedContentType":"text/csv"',
                # 4: "application/json; charset=utf-8" listed whole: both sides BASE64.
                line(
                    "2024-06-01T12:00:04Z",
                    side("INPUT", "application/json; charset=utf-8", b'{"x": [1, 2]}', "BASE64"),
                    side("OUTPUT", "Application/JSON; charset=utf-8", b'{"y": 1}', "BASE64"),
                ),
                # 5: no side at all.
                line("2024-06-01T12:00:05Z"),
                # 6: CSV captured as BASE64 (input only).
                line("2024-06-01T12:00:06Z", side("INPUT", "text/csv", b"7,8,9\n", "BASE64")),
                # 7: text/html that is HTML, both sides BASE64: no problem.
                line(
                    "2024-06-01T12:00:07Z",
                    side("INPUT", "text/html", html.encode(), "BASE64"),
                    side("OUTPUT", "text/html; charset=utf-8", html.encode(), "BASE64"),
                ),
                # 8: a JSON type on a body that is not UTF-8: BASE64 by the rule, no problem.
                line("2024-06-01T12:00:08Z", side("INPUT", "application/json", b"\xff\xfe{}", "BASE64")),
                # 9: an empty line.
                b"",
                json_record("2024-06-01T12:00:10Z", '{"x": 3}', '{"y": 0}'),
            ],
        )
        # Hour 14: a zstd file cut in half, lines long enough for several zstd blocks.
        many = [
            csv_record(f"2024-06-01T14:{i // 60 % 60:02d}:{i % 60:02d}Z", f"{i},{i * 7 % 1000}," * 40, f"{i}")
            for i in range(3000)
        ]
        frame = zstd(b"".join(x + b"\n" for x in many))
        assert len(many[0]) * len(many) > 4 * 128 * 1024  # several blocks of 128 KiB
        half = frame[: len(frame) // 2]
        z = capture_file(root, "churn", "AllTraffic", "2024/06/01/14", "00-00-000")
        self.z = str(z) + ".zst"
        Path(self.z).write_bytes(half)
        prefix = zstandard.ZstdDecompressor().decompressobj().decompress(half)
        self.z_lines = prefix.count(b"\n")  # complete lines before the cut
        assert 0 < self.z_lines < len(many)
        # Canary, hour 12 only: one good record, two corrupt lines.
        c = capture_file(root, "churn", "Canary", "2024/06/01/12", "30-00-000")
        self.c = write_lines(
            c,
            [
                json_record("2024-06-01T12:30:00Z", '{"x": 1}', '{"y": 1}'),
                b"not json at all",
                b'{"captureData":{},"eventMetadata":{"eventId":"e","inferenceTime":"yesterday"},"eventVersion":"0"}',
            ],
        )
        # Keys outside the layout.
        (root / "manifest.json").write_text("{}")
        (root / "churn" / "AllTraffic" / "stray.jsonl").write_bytes(SAMPLE_CSV + b"\n")
        hour12 = root / "churn" / "AllTraffic" / "2024" / "06" / "01" / "12"
        (hour12 / "notes.txt").write_text("notes")
        (hour12 / "capture.jsonl.gz").write_bytes(b"\x1f\x8b")
        self.outside = [
            str(root / "manifest.json"),
            str(root / "churn" / "AllTraffic" / "stray.jsonl"),
            str(hour12 / "capture.jsonl.gz"),
            str(hour12 / "notes.txt"),
        ]


def test_every_problem_counted_with_examples(tmp_path: Path) -> None:
    tree = Seeded(tmp_path)
    sel = selection(start="2024-06-01T12:00Z", end="2024-06-01T15:00Z")
    report = run(tmp_path, sel)

    mismatch = problem(report, "encoding_mismatch")
    assert (mismatch.count, mismatch.examples) == (1, (f"{tree.a}:2",))
    assert mismatch.details == ("input CSV, output JSON",)

    b64 = problem(report, "json_or_csv_as_base64")
    assert b64.count == 3  # sides: line 4 twice, line 6 once; not 7 (HTML) nor 8 (not UTF-8)
    assert b64.examples == (f"{tree.a}:4", f"{tree.a}:4", f"{tree.a}:6")
    assert b64.details == (
        "input 'application/json; charset=utf-8' encoded BASE64",
        "output 'Application/JSON; charset=utf-8' encoded BASE64",
        "input 'text/csv' encoded BASE64",
    )

    bad = problem(report, "invalid_line")
    assert bad.count == 4
    assert bad.examples == (f"{tree.a}:3", f"{tree.a}:9", f"{tree.c}:2")

    unreadable = problem(report, "unreadable_file")
    assert (unreadable.count, unreadable.examples) == (1, (tree.z,))
    assert "truncated zstd frame" in unreadable.details[0]
    assert f"after {tree.z_lines} line(s)" in unreadable.details[0]

    no_side = problem(report, "no_side")
    assert (no_side.count, no_side.examples) == (1, (f"{tree.a}:5",))

    outside = problem(report, "outside_layout")
    assert outside.count == 4
    assert outside.examples == tuple(tree.outside[:EXAMPLES])
    assert outside.details == (
        "not a .jsonl or .jsonl.zst file",
        "not in an {endpoint}/{variant}/yyyy/mm/dd/hh/ directory",
        "not a .jsonl or .jsonl.zst file",
    )

    empty = problem(report, "empty_hour")
    assert empty.count == 3  # AllTraffic 13; Canary 13 and 14
    assert empty.examples == (
        f"{tmp_path}/churn/AllTraffic/2024/06/01/13/",
        f"{tmp_path}/churn/Canary/2024/06/01/13/",
        f"{tmp_path}/churn/Canary/2024/06/01/14/",
    )
    assert empty.details[0] == "no record of churn/AllTraffic in hour 2024-06-01T13"
    assert report.empty_hours_checked and report.empty_hours_note == ""

    assert list(report.problems) == list(PROBLEMS)  # every kind, in order
    # The records read, the lines before the cut included.
    assert report.records == 8 + tree.z_lines + 1
    assert report.endpoints == {"churn": {"AllTraffic": 8 + tree.z_lines, "Canary": 1}}
    assert report.variant_hours == {
        "churn/AllTraffic": {"2024-06-01T12": 8, "2024-06-01T14": tree.z_lines},
        "churn/Canary": {"2024-06-01T12": 1},
    }
    assert report.hours == {"2024-06-01T12": 9, "2024-06-01T14": tree.z_lines}
    assert (report.files, report.zstd_files, report.files_with_records) == (3, 1, 3)
    assert report.input.binary == 1

    for text in (format_report(report), format_problems(report)):
        assert_printed(text, report)
        assert f"problems: {sum(p.count for p in report.problems.values())} (7 kinds)" in text
        assert "empty hours not checked" not in text
        for kind in PROBLEMS:
            assert DESCRIPTIONS[kind] in text


def test_examples_are_the_first_three(tmp_path: Path) -> None:
    path = capture_file(tmp_path, "ep", "AllTraffic", "2024/06/01/12")
    write_lines(path, [line("2024-06-01T12:00:00Z") for _ in range(10)])
    report = run(tmp_path, Selection())
    p = report.problems["no_side"]
    assert p.count == 10
    assert p.examples == (f"{path}:1", f"{path}:2", f"{path}:3")
    assert report.input.records == report.output.records == 0
    assert report.input.sizes is None
    assert "input: no records" in format_report(report)


def test_corrupt_line_then_the_rest_is_read(tmp_path: Path) -> None:
    path = capture_file(tmp_path, "ep", "AllTraffic", "2024/06/01/12")
    key = write_lines(
        path,
        [
            csv_record("2024-06-01T12:00:00Z", "1\n", "2"),
            b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"x","encoding":"BASE64"}},"eventMetadata":{"eventId":"e","inferenceTime":"2024-06-01T12:00:01Z"},"eventVersion":"0"}',
            csv_record("2024-06-01T12:00:02Z", "3\n", "4"),
            csv_record("2024-06-01T12:00:03Z", "5\n", "6"),
        ],
    )
    report = run(tmp_path, Selection())
    assert report.problems == {
        "invalid_line": ProblemCount(1, (f"{key}:2",), (report.problems["invalid_line"].details[0],))
    }
    assert "base64" in report.problems["invalid_line"].details[0]
    assert report.records == 3


def test_sagemaker_samples(tmp_path: Path) -> None:
    """SageMaker's own lines: only the third (text/html output holding JSON as BASE64) is wrong."""
    keys = {}
    for endpoint, hour, sample in (
        ("churn-endpoint", "2021/05/18/00", SAMPLE_CSV),
        ("income", "2024/01/19/19", SAMPLE_JSON),
        ("income-lines", "2023/01/19/05", SAMPLE_JSONLINES),
        ("housing", "2021/09/12/08", SAMPLE_HTML),
    ):
        keys[endpoint] = write_lines(capture_file(tmp_path, endpoint, "AllTraffic", hour), [sample])
    report = run(tmp_path, Selection())
    html = f"{keys['housing']}:1"
    assert report.problems == {
        "encoding_mismatch": ProblemCount(1, (html,), ("input JSON, output BASE64",)),
        "json_or_csv_as_base64": ProblemCount(
            1, (html,), ("output 'text/html; charset=utf-8' holds JSON, encoded BASE64",)
        ),
    }
    assert report.input.encodings == {"JSON": 3, "CSV": 1}
    assert report.output.encodings == {"JSON": 2, "BASE64": 1, "CSV": 1}
    assert report.output.content_types == {
        "application/json": 1,
        "application/jsonlines": 1,
        "text/csv; charset=utf-8": 1,
        "text/html; charset=utf-8": 1,
    }
    assert report.first == dt.datetime(2021, 5, 18, 0, 29, 2, tzinfo=dt.UTC)
    assert report.last == dt.datetime(2024, 1, 19, 19, 27, 57, tzinfo=dt.UTC)
    assert not report.empty_hours_checked
    text = format_problems(report)
    assert_printed(text, report)
    assert "empty hours not checked: no bounded window" in text


# -- a clean tree ---------------------------------------------------------------------------------


def clean_tree(root: Path) -> list[Path]:
    big = '{"y": "' + "a" * 4991 + '"}'  # 5000 bytes
    files = [
        capture_file(root, "churn", "AllTraffic", "2024/06/01/10"),
        capture_file(root, "churn", "AllTraffic", "2024/06/01/11"),
        capture_file(root, "churn", "Canary", "2024/06/01/10"),
        capture_file(root, "churn", "Canary", "2024/06/01/11"),
    ]
    write_lines(
        files[0],
        [
            csv_record("2024-06-01T10:00:01Z", "1,2,3\n", "0.5"),
            csv_record("2024-06-01T10:20:00Z", "10,20,30\n", "0.25"),
            csv_record("2024-06-01T10:59:59Z", "100,200,300\n", "0.125"),
        ],
    )
    data = json_record("2024-06-01T11:00:00Z", '{"x": 1}', '{"y": 0}') + b"\n"
    data += json_record("2024-06-01T11:30:00Z", '{"x": [1, 2, 3]}', big) + b"\n"
    files[1] = files[1].with_name(files[1].name + ".zst")
    files[1].write_bytes(zstd(data))
    jsonlines = "application/jsonlines"
    write_lines(
        files[2], [line("2024-06-01T10:10:00Z", side("INPUT", jsonlines, '{"a":1}\n{"a":2}\n', "JSON"))]
    )
    write_lines(
        files[3],
        [line("2024-06-01T11:59:59Z", side("INPUT", jsonlines, '{"a":3}\n', "JSON"), inference_id="id-1")],
    )
    return files


def test_clean_tree_statistics(tmp_path: Path) -> None:
    files = clean_tree(tmp_path)
    report = run(tmp_path, Selection())
    assert report.problems == {}
    assert report.records == 7
    assert report.endpoints == {"churn": {"AllTraffic": 5, "Canary": 2}}
    assert report.hours == {"2024-06-01T10": 4, "2024-06-01T11": 3}
    assert report.variant_hours == {
        "churn/AllTraffic": {"2024-06-01T10": 3, "2024-06-01T11": 2},
        "churn/Canary": {"2024-06-01T10": 1, "2024-06-01T11": 1},
    }
    assert (report.files, report.zstd_files, report.files_with_records) == (4, 1, 4)
    assert report.bytes == sum(f.stat().st_size for f in files)
    assert report.first == dt.datetime(2024, 6, 1, 10, 0, 1, tzinfo=dt.UTC)
    assert report.last == dt.datetime(2024, 6, 1, 11, 59, 59, tzinfo=dt.UTC)

    assert report.input.records == 7
    assert report.input.encodings == {"JSON": 4, "CSV": 3}
    assert report.input.content_types == {"text/csv": 3, "application/json": 2, "application/jsonlines": 2}
    # 6, 9, 12 (CSV), 8, 16 (JSON), 16, 8 (JSON Lines): nearest rank 4 of 7 and 7 of 7.
    assert report.input.sizes == Sizes(count=7, min=6, p50=9, p99=16, max=16, total=75)
    assert report.output.records == 5
    assert report.output.encodings == {"CSV": 3, "JSON": 2}
    assert report.output.content_types == {"text/csv; charset=utf-8": 3, "application/json": 2}
    assert report.output.sizes == Sizes(count=5, min=3, p50=5, p99=5000, max=5000, total=5020)
    assert report.input.binary == report.output.binary == 0

    text = format_report(report)
    assert "no problems\n" in text
    assert "empty hours not checked: no bounded window" in text
    assert re.search(r"^records +7$", text, re.MULTILINE)
    assert re.search(r"^files +4 \(\d[\d,]* bytes stored, 1 zstd", text, re.MULTILINE)
    assert re.search(r"^time range +2024-06-01T10:00:01Z \.\. 2024-06-01T11:59:59Z$", text, re.MULTILINE)
    assert "window              none (every hour)\n" in text
    assert re.search(r"^  churn / AllTraffic +5$", text, re.MULTILINE)
    assert re.search(r"^    2024-06-01T10 +3$", text, re.MULTILINE)
    assert "encodings      JSON 4, CSV 3" in text
    assert re.search(r"content types  text/csv +3\n +application/json +2\n", text)
    assert "body bytes     min 3, p50 5, p99 5,000, max 5,000, total 5,020" in text

    # JSON, as `--stats --json` would print it.
    doc = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(report)))
    assert doc["records"] == 7
    assert doc["first"] == "2024-06-01T10:00:01Z"
    assert doc["input"]["sizes"]["p50"] == 9
    assert doc["problems"] == {}


def test_clean_tree_in_a_window_has_no_problem(tmp_path: Path) -> None:
    clean_tree(tmp_path)
    report = run(tmp_path, selection(start="2024-06-01T10:00Z", end="2024-06-01T12:00Z"))
    assert report.records == 7
    assert report.empty_hours_checked
    assert report.problems == {}
    assert format_problems(report) == "no problems\n"


def test_empty_hours_in_a_longer_window(tmp_path: Path) -> None:
    clean_tree(tmp_path)
    report = run(tmp_path, selection(endpoint="churn", start="2024-06-01T09:30Z", end="2024-06-01T12:00Z"))
    empty = report.problems["empty_hour"]
    assert empty.count == 2  # hour 09 of both variants
    assert empty.examples == (
        f"{tmp_path}/churn/AllTraffic/2024/06/01/09/",
        f"{tmp_path}/churn/Canary/2024/06/01/09/",
    )
    assert list(report.problems) == ["empty_hour"]


def test_empty_hours_not_checked_when_ids_select(tmp_path: Path) -> None:
    clean_tree(tmp_path)
    sel = selection(start="2024-06-01T10:00Z", end="2024-06-01T12:00Z", inference_ids=["id-1"])
    report = run(tmp_path, sel)
    assert report.records == 1
    assert report.problems == {}
    assert "empty hours not checked: records are selected by inference id" in format_problems(report)


def test_size_histogram_exact_below_1k_then_within_1_in_128() -> None:
    h = SizeHistogram()
    for size in range(1, 2001):
        h.add(size)
    # p50: the 1000th size, exact; p99: the 1980th, in the bucket 1976..1983.
    assert h.summary() == Sizes(count=2000, min=1, p50=1000, p99=1983, max=2000, total=2001000)
    big = SizeHistogram()
    for size in range(0, 6_291_456, 7):
        big.add(size)
    assert len(big._buckets) <= 1024 + 128 * 13  # bounded whatever the count
    summary = big.summary()
    assert summary is not None
    true_p50 = 7 * ((summary.count + 1) // 2 - 1)
    assert true_p50 <= summary.p50 <= true_p50 * (1 + 1 / 128)
    assert summary.max == 6_291_455 - 6_291_455 % 7
    # Counted sizes (the block path) give the same histogram as adding them one by one.
    sizes = [7 * i % 5000 for i in range(3000)] + [0, 1, 1_000_003, 6_291_455]
    one_by_one, counted = SizeHistogram(), SizeHistogram()
    for size in sizes:
        one_by_one.add(size)
    counted.add_counted(collections.Counter(sizes[:1000]))
    counted.add_counted(collections.Counter(sizes[1000:]))
    assert counted.summary() == one_by_one.summary()
    assert counted._buckets == one_by_one._buckets


def test_bounded_content_types_and_examples() -> None:
    stats = Stats(Selection())
    when = dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC)
    for i in range(200):
        body = Side(f"application/x-type-{i}", "BASE64", b"x", False)
        stats.add(Capture("ep", "v", f"ep/v/2024/06/01/12/{i}.jsonl", 1, "e", when, None, None, body, None))
    for i in range(100):
        stats.on_problem("invalid_line", f"k:{i}", "bad")
    report = stats.report()
    assert len(report.input.content_types) == MAX_CONTENT_TYPES + 1
    assert report.input.content_types["(other)"] == 200 - MAX_CONTENT_TYPES
    assert report.problems["invalid_line"] == ProblemCount(100, ("k:0", "k:1", "k:2"), ("bad",) * 3)
    assert report.files_with_records == 200


def test_json_types_and_sniffing() -> None:
    stats = Stats(Selection())
    when = dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC)
    cases = [
        ("application/vnd.api+json", b"{}", True),
        ("application/x-ndjson", b'{"a":1}\n', True),
        ("application/csv", b"1,2", True),
        ("text/plain", b'{"a":1}\n{"a":2}\n', True),  # JSON Lines
        ("text/plain", b"0.5", False),  # a number, not a document
        ("text/html", b"[1, 2", False),
        ("application/octet-stream", b"{}", False),
        (None, b"{}", False),
    ]
    for i, (ct, body, _) in enumerate(cases, 1):
        side_ = Side(ct, "BASE64", body, False)
        stats.add(Capture("ep", "v", "ep/v/2024/06/01/12/a.jsonl", i, "e", when, None, None, side_, None))
    flagged = sum(1 for *_, bad in cases if bad)
    p = stats.report().problems["json_or_csv_as_base64"]
    assert p.count == flagged
    assert p.examples == (
        "ep/v/2024/06/01/12/a.jsonl:1",
        "ep/v/2024/06/01/12/a.jsonl:2",
        "ep/v/2024/06/01/12/a.jsonl:3",
    )


def test_outside_reasons() -> None:
    assert outside_reason("capture/churn//AllTraffic/2024/06/01/12/a.jsonl") == "an empty path segment (//)"
    assert (
        outside_reason("capture/churn/AllTraffic/2024/06/01/12/a.json") == "not a .jsonl or .jsonl.zst file"
    )
    assert outside_reason("capture/churn/AllTraffic/2024/06/01/a.jsonl.zst") == (
        "not in an {endpoint}/{variant}/yyyy/mm/dd/hh/ directory"
    )


def test_problem_kinds_documented() -> None:
    import captured.reader.lint as lint

    assert set(DESCRIPTIONS) == set(PROBLEMS)
    for kind in PROBLEMS:
        assert f"`{kind}`" in (lint.__doc__ or "")


# -- lines a fast path could misread: each alone in a file, with good records around it ------------

GOOD = csv_record("2024-06-01T12:00:00Z", "1,2\n", "0.5")
_META = b'"eventMetadata":{"eventId":"e","inferenceTime":"2024-06-01T12:00:03Z"}'
_SIDE = b'{"observedContentType":"text/csv","mode":"INPUT","data":"1,2","encoding":"CSV"}'
ODD_LINES = {
    "whitespace only": b"   \t",
    "two records on one line": GOOD + b" " + GOOD,
    "leading spaces": b"  " + GOOD,
    "carriage return": GOOD + b"\r",
    "pretty printed": b'{"captureData":\n{},\n' + _META + b"}",
    "split after a brace": b'{"captureData":{"endpointInput":' + _SIDE + b"}\n," + _META + b"} " + GOOD,
    "side without mode": b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","data":"1",'
    b'"encoding":"CSV"}},' + _META + b"}",
    "side without content type": b'{"captureData":{"endpointInput":{"mode":"INPUT","data":"1",'
    b'"encoding":"CSV"}},' + _META + b"}",
    "data not a string": b'{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT",'
    b'"data":12,"encoding":"CSV"}},' + _META + b"}",
    "mode not SageMaker's": _SIDE.join([b'{"captureData":{"endpointInput":', b"}," + _META + b"}"]).replace(
        b'"INPUT"', b'"REQUEST"'
    ),
    "no eventId": b'{"captureData":{},"eventMetadata":{"inferenceTime":"2024-06-01T12:00:03Z"}}',
    "eventVersion 1": b'{"captureData":{"endpointInput":' + _SIDE + b"}," + _META + b',"eventVersion":"1"}',
    "eventVersion a number": b'{"captureData":{},' + _META + b',"eventVersion":0}',
    "customAttributes a number": b'{"captureData":{"endpointInput":' + _SIDE + b'},"eventMetadata":'
    b'{"eventId":"e","inferenceTime":"2024-06-01T12:00:03Z","customAttributes":7}}',
    "unknown encoding": b'{"captureData":{"endpointInput":'
    + _SIDE.replace(b'"CSV"', b'"UTF8"')
    + b"},"
    + _META
    + b"}",
    "time with fraction": GOOD.replace(b"12:00:00Z", b"12:00:00.250Z"),
    "time with offset": GOOD.replace(b"12:00:00Z", b"14:00:00+02:00"),
    "time with a 60th minute": GOOD.replace(b"12:00:00Z", b"12:60:00Z"),
    "time on June 31": GOOD.replace(b"06-01T12:00:00Z", b"06-31T12:00:00Z"),
    "time at hour 24": GOOD.replace(b"12:00:00Z", b"24:00:00Z"),
    "time in lower case": GOOD.replace(b"T12:00:00Z", b"t12:00:00z"),
    "time of another length": GOOD.replace(b"2024-06-01T12:00:00Z", b"24-06-01T12:00:00Z"),
    "escaped non-ASCII": GOOD.replace(b'"1,2\\n"', b'"caf\\u00e9,2"'),
    "raw non-ASCII": GOOD.replace(b'"1,2\\n"', '"caf\u00e9,2"'.encode()),
    "invalid UTF-8": GOOD.replace(b'"1,2\\n"', b'"caf\xe9,2"'),
    "lone surrogate": GOOD.replace(b'"1,2\\n"', b'"\\ud800,2"'),
}


def test_odd_lines_read_the_same_both_ways(tmp_path: Path) -> None:
    """Each odd line between two good records, one file each: the record path, the block path and
    the split paths agree (`run`), and the good records around it are all counted."""
    for i, (name, odd) in enumerate(ODD_LINES.items()):
        assert b"\n" not in odd.replace(b"\n{},\n", b"").replace(b"}\n,", b""), name
        path = capture_file(tmp_path, "churn", "AllTraffic", "2024/06/01/12", f"{i:02d}-00-000")
        path.write_bytes(GOOD + b"\n" + odd + b"\n" + GOOD + b"\n")
    report = run(tmp_path, Selection())
    assert report.records >= 2 * len(ODD_LINES)
    assert report.files_with_records == len(ODD_LINES)


def read_all(leader: int) -> bytes:
    """Everything written to a pty whose follower side is closed (one read may return a part)."""
    chunks = []
    try:
        while chunk := os.read(leader, 1 << 16):
            chunks.append(chunk)
    except OSError:  # EIO: the follower is closed and all was read
        pass
    finally:
        os.close(leader)
    return b"".join(chunks)


def test_stats_progress_on_a_terminal_then_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--stats` shows files and records done on stderr when it is a terminal (a real pty), in one
    process and with workers, and clears the line before the report; nothing when it is not."""
    root = tmp_path / "captures"
    for f in range(3):
        lines = [csv_record(f"2024-06-01T12:{f:02d}:{i % 60:02d}Z", "1,2\n", "0.5") for i in range(2000)]
        write_lines(capture_file(root, "churn", "AllTraffic", "2024/06/01/12", f"{f:02d}-00-000"), lines)
    monkeypatch.setattr(reader_cli.Progress, "EVERY_S", 0.0)  # show at every step, not every 0.5 s
    for workers in ("1", "2"):
        leader, follower = pty.openpty()
        with open(follower, "w") as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert service_cli.main(["read", str(root), "--stats", "--workers", workers]) == 0
        shown = read_all(leader).decode()
        assert "\r3/3 files, 6000 records, " in shown, (workers, shown)
        *_, line, end = shown.split("\r")
        assert end == "" and line.strip() == "" and len(line) >= len("3/3 files, 6000 records, "), shown
        assert re.search(r"^records +6,000$", capsys.readouterr().out, re.MULTILINE)
    with open(tmp_path / "stderr", "w") as not_a_terminal:
        monkeypatch.setattr(sys, "stderr", not_a_terminal)
        assert service_cli.main(["read", str(root), "--stats", "--workers", "1"]) == 0
    assert (tmp_path / "stderr").read_text() == ""
    assert re.search(r"^records +6,000$", capsys.readouterr().out, re.MULTILINE)


def test_default_workers_count_zstd_objects_by_the_lines_they_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zstd tree of 57 MB holds about 600 MB of lines: it gets the workers a plain tree of that
    size gets, not one process (`bench/read.py --zstd` ran in one)."""
    monkeypatch.setattr(batch, "_cpus", lambda: 6)
    place = Place("churn", "AllTraffic", dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC))

    def files(suffix: str, each: int, n: int) -> list[FileRef]:
        return [FileRef(f"k{i}{suffix}", f"k{i}{suffix}", place, each) for i in range(n)]

    assert batch.default_workers(files(".jsonl", 1 << 20, 63)) == 1
    assert batch.default_workers(files(".jsonl", 1 << 20, 64)) == batch.MAX_WORKERS == 4
    assert batch.default_workers(files(".jsonl.zst", 1 << 20, 8)) == 4  # 8 MiB stored, ~64 MiB of lines
    assert batch.default_workers(files(".jsonl.zst", 1 << 20, 7)) == 1
    monkeypatch.setattr(batch, "_cpus", lambda: 2)
    assert batch.default_workers(files(".jsonl.zst", 1 << 20, 57)) == 2
    # S3: a spawned worker costs more, so larger reads only.
    assert batch.default_workers(files(".jsonl", 1 << 20, 255), batch.S3_PARALLEL_BYTES) == 1
    assert batch.default_workers(files(".jsonl", 1 << 20, 256), batch.S3_PARALLEL_BYTES) == 2


def test_workers_are_spawned_when_the_process_runs_threads(tmp_path: Path) -> None:
    """Forking a process that runs another thread can copy a lock that thread holds: with one
    alive, the workers are spawned instead, and the report is the same."""
    tree = Seeded(tmp_path)
    sel = Selection()
    source = open_source(str(tree.root))
    listing = source.listing(sel)
    one = Stats(sel)
    one.listing(listing)
    batch.count(source, listing, one, workers=1)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, name="a model server's thread")
    busy.start()
    try:
        assert batch._start_method(source) == "spawn"
        two = Stats(sel)
        two.listing(listing)
        batch.count(source, listing, two, workers=2)
    finally:
        stop.set()
        busy.join()
    assert two.report() == one.report()
    assert two.report().problems  # the seeded tree: every kind is there to compare


def test_json_report_is_the_report_and_validate_still_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--stats --json` prints the whole report as one JSON document that decodes back to the
    report a read gives; `--validate --json` too, still exiting 1 on problems; `--json` alone is
    a usage error."""
    Seeded(tmp_path)
    window = ["--start", "2024-06-01T12:00Z", "--end", "2024-06-01T15:00Z"]
    report = run(tmp_path, selection(start="2024-06-01T12:00Z", end="2024-06-01T15:00Z"))
    assert report.problems and report.empty_hours_checked
    assert service_cli.main(["read", str(tmp_path), "--stats", "--json", *window]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    assert msgspec.json.decode(printed, type=Report) == report
    assert service_cli.main(["read", str(tmp_path), "--validate", "--json", *window]) == 1
    assert msgspec.json.decode(capsys.readouterr().out, type=Report) == report
    assert service_cli.main(["read", str(tmp_path), "--json"]) == 2
    assert "--json goes with --stats or --validate" in capsys.readouterr().err


def test_mismatches_where_one_side_is_in_every_record_and_the_other_in_some(tmp_path: Path) -> None:
    """The block path's shortcuts for encoding mismatches (one side in every record of a block,
    the other in some) find what the record path finds."""
    csv_in, json_in = (
        side("INPUT", "text/csv", "1,2\n", "CSV"),
        side("INPUT", "application/json", "{}", "JSON"),
    )
    csv_out, json_out = (
        side("OUTPUT", "text/csv", "0.5", "CSV"),
        side("OUTPUT", "application/json", "1", "JSON"),
    )
    t = "2024-06-01T12:00:0{}Z".format
    inputs_everywhere = [line(t(1), csv_in), line(t(2), csv_in, json_out), line(t(3), json_in, json_out)]
    outputs_everywhere = [
        line(t(4), None, csv_out),
        line(t(5), json_in, csv_out),
        line(t(6), csv_in, csv_out),
    ]
    a = write_lines(
        capture_file(tmp_path, "churn", "AllTraffic", "2024/06/01/12", "00-00-000"), inputs_everywhere
    )
    b = write_lines(
        capture_file(tmp_path, "churn", "AllTraffic", "2024/06/01/12", "01-00-000"), outputs_everywhere
    )
    report = run(tmp_path, Selection())
    mismatch = problem(report, "encoding_mismatch")
    assert (mismatch.count, mismatch.examples) == (2, (f"{a}:2", f"{b}:2"))
    assert mismatch.details == ("input CSV, output JSON", "input JSON, output CSV")
    assert "no_side" not in report.problems
