"""What a read met: the report of `captured read --stats` / `--validate` as data (`Report`;
`msgspec.to_builtins(report)` for JSON), its problem kinds, and the text the command prints.
`lint.Stats` makes it; the kinds are described in `captured.reader.lint`.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from captured.reader.stream import BAD_LINE, BAD_OBJECT

ENCODING_MISMATCH = "encoding_mismatch"
JSON_OR_CSV_AS_BASE64 = "json_or_csv_as_base64"
INVALID_LINE = BAD_LINE
UNREADABLE_FILE = BAD_OBJECT
NO_SIDE = "no_side"
OUTSIDE_LAYOUT = "outside_layout"
EMPTY_HOUR = "empty_hour"

#: Every problem kind, in the order reports list them (each is described in the module docstring).
PROBLEMS: tuple[str, ...] = (
    ENCODING_MISMATCH,
    JSON_OR_CSV_AS_BASE64,
    INVALID_LINE,
    UNREADABLE_FILE,
    NO_SIDE,
    OUTSIDE_LAYOUT,
    EMPTY_HOUR,
)

#: One line per problem kind, as the text reports print it.
DESCRIPTIONS: dict[str, str] = {
    ENCODING_MISMATCH: "records whose input and output encodings differ (Model Monitor: Encoding mismatch)",
    JSON_OR_CSV_AS_BASE64: "JSON or CSV sides captured as BASE64 (type not in CaptureContentTypeHeader)",
    INVALID_LINE: "lines that are not valid capture records",
    UNREADABLE_FILE: "files that cannot be read whole (lines before the fault are counted)",
    NO_SIDE: "records with neither endpointInput nor endpointOutput",
    OUTSIDE_LAYOUT: "keys under the root outside {endpoint}/{variant}/yyyy/mm/dd/hh/*.jsonl[.zst]",
    EMPTY_HOUR: "hours of the window without a record of an endpoint/variant (Model Monitor: no data)",
}


class Sizes(msgspec.Struct, frozen=True):
    """Body sizes in bytes (see the module docstring for how p50 and p99 are computed)."""

    count: int
    min: int
    p50: int
    p99: int
    max: int
    total: int


class SideReport(msgspec.Struct, frozen=True):
    """One side (input or output) over the records read."""

    records: int
    encodings: dict[str, int]
    #: `observedContentType` as stored, parameters included; `(none)` for null.
    content_types: dict[str, int]
    #: BASE64 bodies that are not valid UTF-8.
    binary: int
    sizes: Sizes | None


class ProblemCount(msgspec.Struct, frozen=True):
    count: int
    #: Up to `lint.EXAMPLES` keys, the first met: `key:line` for a record, the key for a file.
    examples: tuple[str, ...]
    #: What is wrong with each example, in the same order.
    details: tuple[str, ...]


class Report(msgspec.Struct, frozen=True):
    """What a read met (`msgspec.to_builtins(report)` for JSON)."""

    records: int
    #: Capture files selected for reading, their stored bytes, how many are zstd.
    files: int
    bytes: int
    zstd_files: int
    files_with_records: int
    #: The earliest and latest inferenceTime of the records.
    first: dt.datetime | None
    last: dt.datetime | None
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    empty_hours_checked: bool
    #: Why empty hours were not checked ("" when they were).
    empty_hours_note: str
    #: endpoint -> variant -> records.
    endpoints: dict[str, dict[str, int]]
    #: UTC hour (`yyyy-mm-ddThh`, of inferenceTime) -> records.
    hours: dict[str, int]
    #: `endpoint/variant` -> UTC hour -> records.
    variant_hours: dict[str, dict[str, int]]
    input: SideReport
    output: SideReport
    #: Only the kinds met, in `PROBLEMS` order: empty when there is no problem.
    problems: dict[str, ProblemCount]


def _time(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    text = when.astimezone(dt.UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def format_report(report: Report) -> str:
    """The text `captured read --stats` prints."""
    parts = [
        _summary(report),
        _counts_by_place(report),
        _side_text("input", report.input),
        _side_text("output", report.output),
        format_problems(report),
    ]
    return "\n".join(p for p in parts if p)


def format_problems(report: Report) -> str:
    """The text `captured read --validate` prints: the problems only, "no problems" when none."""
    lines: list[str] = []
    if not report.problems:
        lines.append("no problems")
    else:
        total = sum(p.count for p in report.problems.values())
        lines.append(f"problems: {total} ({len(report.problems)} kinds)")
        width = max(len(k) for k in report.problems)
        cwidth = max(len(str(p.count)) for p in report.problems.values())
        for kind, p in report.problems.items():
            about = DESCRIPTIONS.get(kind, "")
            lines.append(f"  {kind:<{width}}  {p.count:>{cwidth}}  {about}".rstrip())
            lines.extend(
                _example_line(key, detail) for key, detail in zip(p.examples, p.details, strict=True)
            )
    if not report.empty_hours_checked:
        lines.append(f"empty hours not checked: {report.empty_hours_note}")
    return "\n".join(lines) + "\n"


def _example_line(key: str, detail: str) -> str:
    return f"      {key}  ({detail})" if detail else f"      {key}"


def _summary(report: Report) -> str:
    zstd = f", {report.zstd_files:,} zstd: Model Monitor reads only .jsonl" if report.zstd_files else ""
    rows = [
        ("records", f"{report.records:,}"),
        ("files", f"{report.files:,} ({report.bytes:,} bytes stored{zstd})"),
        ("files with records", f"{report.files_with_records:,}"),
        ("time range", f"{_time(report.first)} .. {_time(report.last)}"),
        ("window", _window(report)),
    ]
    return _rows(rows, indent="") + "\n"


def _window(report: Report) -> str:
    if report.window_start is None and report.window_end is None:
        return "none (every hour)"
    return f"{_time(report.window_start)} .. {_time(report.window_end)} (end excluded)"


def _counts_by_place(report: Report) -> str:
    if not report.variant_hours:
        return ""
    rows: list[tuple[str, str]] = []
    for endpoint, variants in report.endpoints.items():
        for variant, count in variants.items():
            rows.append((f"{endpoint} / {variant}", f"{count:,}"))
            hours = report.variant_hours.get(f"{endpoint}/{variant}", {})
            rows.extend((f"  {hour}", f"{n:,}") for hour, n in hours.items())
    return "records per endpoint / variant / hour (UTC)\n" + _rows(rows, right=True) + "\n"


def _side_text(name: str, side: SideReport) -> str:
    if not side.records:
        return f"{name}: no records\n"
    rows = [("encodings", ", ".join(f"{enc} {n:,}" for enc, n in side.encodings.items()))]
    types = _rows([(ct, f"{n:,}") for ct, n in side.content_types.items()], indent="", right=True)
    rows.extend(("content types" if i == 0 else "", line) for i, line in enumerate(types.split("\n")))
    if side.sizes is not None:
        s = side.sizes
        sizes = f"min {s.min:,}, p50 {s.p50:,}, p99 {s.p99:,}, max {s.max:,}, total {s.total:,}"
        rows.append(("body bytes", sizes))
    if side.binary:
        rows.append(("binary", f"{side.binary:,} (BASE64 bodies that are not UTF-8)"))
    return f"{name}: {side.records:,} records\n" + _rows(rows) + "\n"


def _rows(rows: list[tuple[str, str]], *, indent: str = "  ", right: bool = False) -> str:
    """Two aligned columns, the second right-aligned when `right`."""
    width = max(len(label) for label, _ in rows)
    vwidth = max(len(value) for _, value in rows) if right else 0
    return "\n".join(f"{indent}{label:<{width}}  {value:>{vwidth}}".rstrip() for label, value in rows)
