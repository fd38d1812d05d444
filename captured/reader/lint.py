"""Statistics of a read and what in it breaks Model Monitor or Athena (`captured read --stats`,
`--validate`), in bounded memory.

    stats = Stats(selection)
    stats.listing(listing)                      # files to read, keys outside the layout
    for c in captures(source, listing, selection, stats.on_problem):
        stats.add(c)
    print(report.format_report(stats.report()))  # or format_problems(): `--validate`

The report (`report.Report`), its problem kinds and its text are in `captured.reader.report`.

Memory stays bounded whatever the number of records: counters (per endpoint/variant, per hour,
per encoding, per content type, at most `MAX_CONTENT_TYPES` of these per side, the rest counted
as `(other)`), a size histogram per side, and at most `EXAMPLES` example keys per problem kind.

Body sizes (the decoded body's bytes, per side): count, min, max and total are exact; p50 and
p99 (nearest rank: the smallest size with at least that share of bodies at or below it) come
from a log-linear histogram: one bucket per size below `EXACT_BELOW` bytes (exact there), above
it each power of two split into 2**`SUB_BITS` = 128 buckets, and a quantile there is the upper
bound of its bucket clamped to [min, max] (at most 1/128, under 0.8 %, above the true value;
exact when it falls in the bucket of the largest size). About 8,000 buckets at most per side.

Problem kinds (`PROBLEMS`), the condition of each and why it hurts:

- `encoding_mismatch`: a record with both sides whose input and output encodings differ (e.g.
  input JSON, output BASE64). Model Monitor's analyser fails a job that analyses both sides
  on such a record: "Encoding mismatch: Encoding is CSV for endpointInput, but Encoding is
  JSON for endpointOutput. We currently only support the same type of input and output encoding
  at the moment." (aws/sagemaker-python-sdk issue 2785). Counted per record.
- `json_or_csv_as_base64`: a side encoded BASE64 whose body is valid UTF-8 and whose media type
  (before `;`, stripped, lower-cased) is JSON (`application/json`, `application/jsonlines`,
  `application/jsonl`, `application/x-jsonlines`, `application/x-ndjson`, `application/ndjson`,
  anything `+json`) or CSV (`text/csv`, `application/csv`); or whose media type is `text/html`
  or `text/plain` (types servers put on JSON by mistake) and whose body parses as a JSON object
  or array, or as JSON Lines of them. Its content type was not in `CaptureContentTypeHeader`
  (`application/json; charset=utf-8` listed whole in older configurations, or an unlisted type),
  so Model Monitor reads an opaque base64 string instead of features and Athena or DuckDB need a
  decode step. Counted per side. A body that is not UTF-8 is BASE64 by the encoding rule (spec
  4, step 3), whatever the configuration: not counted.
- `invalid_line` (from the reader): a line that is not a capture record (bad JSON, a missing
  field, an unknown encoding, BASE64 data that is not base64, an empty line). Model Monitor's
  analyser cannot parse it; Athena's JSON SerDe fails the query on it (HIVE_CURSOR_ERROR) unless
  the table ignores malformed JSON, and then it is a row of nulls.
- `unreadable_file` (from the reader): a file or object that cannot be read whole (a truncated
  or corrupt zstd frame, bytes after the frame, an I/O or download error). The lines before the
  fault are read and counted.
- `no_side`: a record with neither `endpointInput` nor `endpointOutput`: nothing for Model
  Monitor to analyse, all nulls for Athena.
- `outside_layout`: a key under the root that is not `{endpoint}/{variant}/yyyy/mm/dd/hh/
  *.jsonl[.zst]` (e.g. a `//` from a trailing slash, another suffix, a missing hour level):
  Model Monitor, which selects hour directories and `.jsonl` files, never sees it, and an
  Athena table over the prefix reads it as capture lines (or fails on it).
- `empty_hour`: with a bounded window (`start` and `end` both given) and no inference id
  filter, an hour overlapping the window in which an endpoint/variant that has records elsewhere
  in the window has none: Model Monitor's hourly job for it fails with "Job inputs had no data"
  (its FailureReason; aws/sagemaker-python-sdk issue 2634).
  Example keys are the hour's prefix. Without a bounded window it is not checked, and the report
  says so.

Compressed files (`.jsonl.zst`, which the daemon writes when asked to) are no problem here, but
the report counts them: Model Monitor reads only `.jsonl`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from captured.reader.layout import CAPTURE_SUFFIXES, HOUR, Selection
from captured.reader.records import BASE64, Capture, Side
from captured.reader.report import (
    EMPTY_HOUR,
    ENCODING_MISMATCH,
    JSON_OR_CSV_AS_BASE64,
    NO_SIDE,
    OUTSIDE_LAYOUT,
    PROBLEMS,
    ProblemCount,
    Report,
    SideReport,
    Sizes,
)
from captured.reader.sources import Listing

#: Example keys kept per problem kind.
EXAMPLES = 3
#: Distinct content types counted per side; the rest are counted as `OTHER`.
MAX_CONTENT_TYPES = 32
OTHER = "(other)"
NO_CONTENT_TYPE = "(none)"
#: Sizes below this many bytes have a histogram bucket each (exact quantiles).
EXACT_BELOW = 1024
#: Above EXACT_BELOW, each power of two is split into 2**SUB_BITS buckets.
SUB_BITS = 7
#: Longest window (hours) checked for empty hours.
MAX_WINDOW_HOURS = 24 * 366 * 5
#: Longest detail kept with an example.
MAX_DETAIL = 200

_JSON_TYPES = frozenset(
    {
        "application/json",
        "application/jsonlines",
        "application/jsonl",
        "application/x-jsonlines",
        "application/x-ndjson",
        "application/ndjson",
    }
)
_CSV_TYPES = frozenset({"text/csv", "application/csv"})
#: Types servers put on JSON bodies by mistake: the body is looked at.
_SNIFFED_TYPES = frozenset({"text/html", "text/plain"})


class SizeHistogram:
    """Exact count, min, max and total; quantiles from a log-linear histogram (bounded)."""

    def __init__(self) -> None:
        self.count = 0
        self.min = 0
        self.max = 0
        self.total = 0
        self._buckets: dict[int, int] = {}

    def add(self, size: int) -> None:
        if self.count == 0 or size < self.min:
            self.min = size
        self.max = max(self.max, size)
        self.count += 1
        self.total += size
        low = bucket_low(size)
        self._buckets[low] = self._buckets.get(low, 0) + 1

    def add_counted(self, sizes: Mapping[int, int]) -> None:
        """Sizes already counted (size -> how many): the same as `add` for each."""
        if not sizes:
            return
        low, high = min(sizes), max(sizes)
        if self.count == 0 or low < self.min:
            self.min = low
        self.max = max(self.max, high)
        self.count += sum(sizes.values())
        self.total += sum(size * n for size, n in sizes.items())
        buckets = self._buckets
        for size, n in sizes.items():
            bucket = size if size < EXACT_BELOW else bucket_low(size)
            buckets[bucket] = buckets.get(bucket, 0) + n

    def merge(self, other: SizeHistogram) -> None:
        if other.count == 0:
            return
        if self.count == 0 or other.min < self.min:
            self.min = other.min
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        for bucket, n in other._buckets.items():
            self._buckets[bucket] = self._buckets.get(bucket, 0) + n

    def quantile(self, percent: int) -> int:
        """Nearest rank: the upper bound of the bucket holding the ceil(percent% * count)-th
        smallest size, clamped to [min, max]."""
        rank = max(1, (percent * self.count + 99) // 100)
        seen = 0
        for low in sorted(self._buckets):
            seen += self._buckets[low]
            if seen >= rank:
                return min(max(bucket_high(low), self.min), self.max)
        return self.max

    def summary(self) -> Sizes | None:
        if self.count == 0:
            return None
        return Sizes(self.count, self.min, self.quantile(50), self.quantile(99), self.max, self.total)


def bucket_low(size: int) -> int:
    """The lower bound of the histogram bucket of `size` (its key)."""
    if size < EXACT_BELOW:
        return size
    shift = size.bit_length() - 1 - SUB_BITS
    return (size >> shift) << shift


def bucket_high(low: int) -> int:
    """The upper bound (inclusive) of the histogram bucket whose lower bound is `low`."""
    if low < EXACT_BELOW:
        return low
    return low + (1 << (low.bit_length() - 1 - SUB_BITS)) - 1


class _SideStats:
    def __init__(self) -> None:
        self.records = 0
        self.binary = 0
        self.encodings: dict[str, int] = {}
        self.content_types: dict[str, int] = {}
        self.sizes = SizeHistogram()

    def add(self, side: Side) -> None:
        self.records += 1
        self.binary += side.binary
        _bump(self.encodings, side.encoding)
        ct = NO_CONTENT_TYPE if side.content_type is None else side.content_type
        if ct not in self.content_types and len(self.content_types) >= MAX_CONTENT_TYPES:
            ct = OTHER
        _bump(self.content_types, ct)
        self.sizes.add(len(side.data))

    def add_counts(
        self,
        present: int,
        binary: int,
        encodings: Mapping[str, int],
        content_types: Mapping[str, int] | Mapping[str | None, int],
        sizes: Mapping[int, int],
    ) -> None:
        """A block's sides at once (`batch`): the same counts as `add` for each of them; `sizes`
        maps a body size to how many sides have it."""
        self.records += present
        self.binary += binary
        for encoding, n in encodings.items():
            self.encodings[encoding] = self.encodings.get(encoding, 0) + n
        for raw, n in content_types.items():
            ct = NO_CONTENT_TYPE if raw is None else raw
            if ct not in self.content_types and len(self.content_types) >= MAX_CONTENT_TYPES:
                ct = OTHER
            self.content_types[ct] = self.content_types.get(ct, 0) + n
        self.sizes.add_counted(sizes)

    def merge(self, other: _SideStats) -> None:
        self.add_counts(other.records, other.binary, other.encodings, other.content_types, {})
        self.sizes.merge(other.sizes)

    def report(self) -> SideReport:
        return SideReport(
            records=self.records,
            encodings=_by_count(self.encodings),
            content_types=_by_count(self.content_types),
            binary=self.binary,
            sizes=self.sizes.summary(),
        )


class _Problems:
    """Counts and the first `EXAMPLES` examples of each kind."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[tuple[str, str]]] = {}

    def add(self, kind: str, key: str, detail: str) -> None:
        _bump(self.counts, kind)
        examples = self.examples.setdefault(kind, [])
        if len(examples) < EXAMPLES:
            examples.append((key, detail[:MAX_DETAIL]))

    def merge(self, other: _Problems) -> None:
        """`other`'s, met after these: counts add up, examples stay the first ones met."""
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            examples = self.examples.setdefault(kind, [])
            examples.extend(other.examples.get(kind, [])[: max(0, EXAMPLES - len(examples))])

    def report(self, more: dict[str, ProblemCount]) -> dict[str, ProblemCount]:
        """The kinds met (and those of `more`, counted elsewhere), in `PROBLEMS` order."""
        found = {k: _problem_count(n, self.examples[k]) for k, n in self.counts.items()}
        found.update((k, p) for k, p in more.items() if p.count)
        order = [k for k in PROBLEMS if k in found] + sorted(k for k in found if k not in PROBLEMS)
        return {k: found[k] for k in order}


def _problem_count(count: int, examples: list[tuple[str, str]]) -> ProblemCount:
    return ProblemCount(count, tuple(k for k, _ in examples), tuple(d for _, d in examples))


class _Variant:
    """Records of one endpoint/variant, per UTC hour (aware datetimes, start of the hour)."""

    def __init__(self, prefix: str) -> None:
        #: The key prefix of the variant (`.../{endpoint}/{variant}/`), for empty hours' examples.
        self.prefix = prefix
        self.hours: dict[dt.datetime, int] = {}
        self._hour = dt.datetime.min.replace(tzinfo=dt.UTC)  # the last record's hour

    def add(self, when: dt.datetime) -> None:
        if not self._hour <= when < self._hour + HOUR:
            self._hour = when.replace(minute=0, second=0, microsecond=0)
        self.hours[self._hour] = self.hours.get(self._hour, 0) + 1


class Stats:
    """Counts what a read meets; `report()` at the end. See the module docstring."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self._problems = _Problems()
        self._files = self._bytes = self._zstd = 0
        self._records = 0
        self._files_with_records = 0
        self._last_key: str | None = None
        self._first: dt.datetime | None = None
        self._last: dt.datetime | None = None
        self._variants: dict[tuple[str, str], _Variant] = {}
        self._input = _SideStats()
        self._output = _SideStats()

    def listing(self, listing: Listing) -> None:
        """The files to be read, and the keys outside the layout (`outside_layout`)."""
        for ref in listing.files:
            self._files += 1
            self._bytes += ref.size
            self._zstd += ref.relative.endswith(".zst")
        for key in listing.outside:
            self._problems.add(OUTSIDE_LAYOUT, key, outside_reason(key))

    def on_problem(self, kind: str, key: str, detail: str) -> None:
        """The reader's `on_problem` (`invalid_line`, `unreadable_file`)."""
        self._problems.add(kind, key, detail)

    def add(self, c: Capture) -> None:
        """One record the reader yielded (already selected)."""
        self._records += 1
        if c.key != self._last_key:
            self._last_key = c.key
            self._files_with_records += 1
        self._count_time(c)
        if c.input is not None:
            self._input.add(c.input)
            self._check_side("input", c.input, c)
        if c.output is not None:
            self._output.add(c.output)
            self._check_side("output", c.output, c)
        if c.input is None and c.output is None:
            self._problems.add(NO_SIDE, _where(c), "")
        elif c.input is not None and c.output is not None and c.input.encoding != c.output.encoding:
            detail = f"input {c.input.encoding}, output {c.output.encoding}"
            self._problems.add(ENCODING_MISMATCH, _where(c), detail)

    @property
    def records_counted(self) -> int:
        return self._records

    def merge(self, other: Stats) -> None:
        """Add what `other` counted over files that come after this one's in key order (a worker
        process of `batch.count`): the report is the one a single pass over both would give."""
        self._records += other._records
        self._files_with_records += other._files_with_records
        for when in (other._first, other._last):
            if when is not None:
                self._first = when if self._first is None else min(self._first, when)
                self._last = when if self._last is None else max(self._last, when)
        for key, var in other._variants.items():
            mine = self._variants.setdefault(key, _Variant(var.prefix))
            for hour, n in var.hours.items():
                mine.hours[hour] = mine.hours.get(hour, 0) + n
        self._input.merge(other._input)
        self._output.merge(other._output)
        self._problems.merge(other._problems)

    # -- the block path (`batch`): the same counts, a block of records at a time --------------

    def add_counts(
        self,
        key: str,
        endpoint: str,
        variant: str,
        records: int,
        hours: dict[dt.datetime, int],
        first: dt.datetime,
        last: dt.datetime,
    ) -> None:
        """`records` records of file `key`, by hour, the earliest and latest of them."""
        self._records += records
        if key != self._last_key:
            self._last_key = key
            self._files_with_records += 1
        if self._first is None or first < self._first:
            self._first = first
        if self._last is None or last > self._last:
            self._last = last
        var = self._variants.get((endpoint, variant))
        if var is None:
            var = self._variants[(endpoint, variant)] = _Variant(key.rsplit("/", 5)[0] + "/")
        for hour, n in hours.items():
            var.hours[hour] = var.hours.get(hour, 0) + n

    def side_counts(
        self,
        name: str,
        present: int,
        binary: int,
        encodings: Mapping[str, int],
        content_types: Mapping[str, int] | Mapping[str | None, int],
        sizes: Mapping[int, int],
    ) -> None:
        """What a block's `name` ("input" or "output") sides add (`sizes`: size -> sides)."""
        side = self._input if name == "input" else self._output
        side.add_counts(present, binary, encodings, content_types, sizes)

    def check_side(self, name: str, side: Side, where: str) -> None:
        """A BASE64 side that is text: JSON or CSV stored as BASE64?"""
        self._check(name, side, where)

    def record_problem(self, kind: str, where: str, detail: str) -> None:
        self._problems.add(kind, where, detail)

    def _count_time(self, c: Capture) -> None:
        when = c.inference_time
        if self._first is None or when < self._first:
            self._first = when
        if self._last is None or when > self._last:
            self._last = when
        variant = self._variants.get((c.endpoint, c.variant))
        if variant is None:
            prefix = c.key.rsplit("/", 5)[0] + "/"
            variant = self._variants[(c.endpoint, c.variant)] = _Variant(prefix)
        variant.add(when)

    def _check_side(self, name: str, side: Side, c: Capture) -> None:
        self._check(name, side, _where(c))

    def _check(self, name: str, side: Side, where: str) -> None:
        if side.encoding != BASE64 or side.binary or side.content_type is None:
            return
        mt = media_type(side.content_type)
        if is_json_or_csv_type(mt):
            detail = f"{name} {side.content_type!r} encoded BASE64"
        elif mt in _SNIFFED_TYPES and looks_like_json(side.data):
            detail = f"{name} {side.content_type!r} holds JSON, encoded BASE64"
        else:
            return
        self._problems.add(JSON_OR_CSV_AS_BASE64, where, detail)

    def report(self) -> Report:
        """What was met so far (the counts go on if more is added)."""
        hours, note = self._window_hours()
        more = {EMPTY_HOUR: self._empty_hours(hours)} if hours else {}
        sel = self.selection
        return Report(
            records=self._records,
            files=self._files,
            bytes=self._bytes,
            zstd_files=self._zstd,
            files_with_records=self._files_with_records,
            first=self._first,
            last=self._last,
            window_start=sel.start,
            window_end=sel.end,
            empty_hours_checked=hours is not None,
            empty_hours_note=note,
            endpoints=self._endpoints(),
            hours=self._hours(),
            variant_hours={
                f"{e}/{v}": {_hour(h): n for h, n in sorted(var.hours.items())}
                for (e, v), var in sorted(self._variants.items())
            },
            input=self._input.report(),
            output=self._output.report(),
            problems=self._problems.report(more),
        )

    def _window_hours(self) -> tuple[list[dt.datetime] | None, str]:
        sel = self.selection
        if sel.start is None or sel.end is None:
            return None, "no bounded window (give both start and end)"
        if sel.inference_ids is not None:
            return None, "records are selected by inference id"
        hours = sel.hours(MAX_WINDOW_HOURS)
        if hours is None:
            return None, f"window longer than {MAX_WINDOW_HOURS} hours"
        return hours, ""

    def _empty_hours(self, hours: list[dt.datetime]) -> ProblemCount:
        count = 0
        examples: list[tuple[str, str]] = []
        for (endpoint, variant), var in sorted(self._variants.items()):
            for hour in hours:
                if hour in var.hours:
                    continue
                count += 1
                if len(examples) < EXAMPLES:
                    detail = f"no record of {endpoint}/{variant} in hour {_hour(hour)}"
                    examples.append((var.prefix + hour.strftime("%Y/%m/%d/%H/"), detail))
        return _problem_count(count, examples)

    def _endpoints(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (endpoint, variant), var in sorted(self._variants.items()):
            out.setdefault(endpoint, {})[variant] = sum(var.hours.values())
        return out

    def _hours(self) -> dict[str, int]:
        total: dict[dt.datetime, int] = {}
        for var in self._variants.values():
            for hour, n in var.hours.items():
                total[hour] = total.get(hour, 0) + n
        return {_hour(h): n for h, n in sorted(total.items())}


def _where(c: Capture) -> str:
    return f"{c.key}:{c.line}"


def outside_reason(key: str) -> str:
    """Why a key outside the layout is (a guess from the key alone)."""
    if "//" in key:  # e.g. a DestinationS3Uri with a trailing /
        return "an empty path segment (//)"
    if not key.endswith(CAPTURE_SUFFIXES):
        return "not a .jsonl or .jsonl.zst file"
    return "not in an {endpoint}/{variant}/yyyy/mm/dd/hh/ directory"


def media_type(content_type: str) -> str:
    """The part of a content type before `;`, stripped and lower-cased (spec 4, step 1)."""
    return content_type.partition(";")[0].strip().lower()


def is_json_or_csv_type(mt: str) -> bool:
    """A media type that names JSON or CSV content."""
    return mt in _JSON_TYPES or mt in _CSV_TYPES or mt.endswith("+json")


def looks_like_json(body: bytes) -> bool:
    """A JSON object or array, or JSON Lines of them."""
    if _json_document(body):
        return True
    lines = [line for line in body.split(b"\n") if line.strip()]
    return len(lines) > 1 and all(_json_document(line) for line in lines)


def _json_document(text: bytes) -> bool:
    text = text.strip()
    if not text or text[:1] not in (b"{", b"["):
        return False
    try:
        msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return True


_K = TypeVar("_K")


def _bump(counts: dict[_K, int], key: _K) -> None:
    counts[key] = counts.get(key, 0) + 1


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _hour(hour: dt.datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")
