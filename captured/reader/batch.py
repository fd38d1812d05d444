"""`captured read --stats` a block of lines at a time: the statistics without a `Capture` per record.

The per-record path (`Stats.add(capture)`) builds a typed record, decodes its bodies and parses
its time, about 12 us a record. Statistics need none of that for a healthy file: each line of a
block is decoded into small structs (`decode`, in C), and the counts are C-level passes over
columns (`map` with attribute getters, `Counter`, list comparisons, one `translate` over all the
block's times). BASE64 bodies alone are decoded (to tell binary ones, and JSON or CSV stored as
BASE64), which healthy JSON and CSV captures do not have. Large reads are split over worker
processes (`count`).

A block the fast path cannot take exactly (a line that is not a record, a time that is not
SageMaker's canonical `yyyy-mm-ddThh:mm:ssZ`) goes through the per-record path instead, so both
give the same report (tests/test_read_lint.py compares them).
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import datetime as dt
import math
import multiprocessing
import operator
import os
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import msgspec
import zstandard

from captured.reader.decode import DECODER, Line, canonical
from captured.reader.decode import Side as BlockSide
from captured.reader.layout import Selection
from captured.reader.lint import Stats
from captured.reader.records import BASE64, LineError, Side, parse_line
from captured.reader.sources import FileRef, Listing, LocalSource, S3Source, Source
from captured.reader.stream import BAD_LINE, BAD_OBJECT, Truncated, decompressed

#: About this many bytes of lines per block.
BLOCK_BYTES = 4 << 20


def blocks(source: Source, files: list[FileRef]) -> Iterator[tuple[FileRef, bytes | BaseException]]:
    """Each file's whole lines (ending in newlines) a block at a time, in order, then, if it failed
    part-way (a torn zstd frame, a read error), the failure: its whole lines before the failure
    come first, as in the per-record path."""
    for ref, chunks in source.contents(files):
        pending: list[bytes] = []
        size = 0
        failure: BaseException | None = None
        try:
            for chunk in decompressed(chunks) if ref.relative.endswith(".zst") else chunks:
                pending.append(chunk)
                size += len(chunk)
                if size >= BLOCK_BYTES:
                    whole = b"".join(pending)
                    cut = whole.rfind(b"\n") + 1
                    if cut:
                        yield ref, whole[:cut]
                        pending, size = [whole[cut:]], len(whole) - cut
        except (OSError, zstandard.ZstdError, Truncated) as exc:
            failure = exc
        rest = b"".join(pending)
        if failure is not None:
            rest = rest[: rest.rfind(b"\n") + 1]  # a torn last line is not a line
        if rest:
            yield ref, rest if rest.endswith(b"\n") else rest + b"\n"
        if failure is not None:
            yield ref, failure


def add_block(
    stats: Stats, ref: FileRef, first: int, block: bytes, limit: int | None = None
) -> tuple[int, int]:
    """Count the selected records of `block` (its first line is line `first` of the file) into
    `stats`, at most `limit`; (how many were counted, how many lines the block holds).

    Everything is computed before `stats` is touched, so a block the fast path gives up on
    half-way goes whole through the per-record path.
    """
    try:
        counted = _count(stats.selection, ref, first, block, limit)
    except (msgspec.DecodeError, ValueError, binascii.Error):  # ValueError: a date that is not one
        counted = None
    if counted is None:
        return _slowly(stats, ref, first, block, limit), block.count(b"\n")
    n, lines, hours, low, high, sides, problems = counted
    if n:
        stats.add_counts(ref.key, ref.place.endpoint, ref.place.variant, n, hours, low, high)
        for name, side in sides:
            stats.side_counts(name, side.present, side.binary, side.encodings, side.types, side.sizes)
        # In record order, input before output, as the per-record path meets them (examples).
        checks = sorted((i, k, name) for k, (name, side) in enumerate(sides) for i in side.checks)
        for i, k, name in checks:
            stats.check_side(name, sides[k][1].checks[i], f"{ref.key}:{problems.number(i)}")
        for kind, i, detail in problems.found:
            stats.record_problem(kind, f"{ref.key}:{problems.number(i)}", detail)
    return n, lines


class _Found(NamedTuple):
    """Record problems of a block: (kind, index in the block, detail), and the line numbers."""

    found: list[tuple[str, int, str]]
    numbers: list[int] | None  # the line numbers of the kept records; None: first + index
    first: int

    def number(self, i: int) -> int:
        return self.numbers[i] if self.numbers is not None else self.first + i


class _Counted(NamedTuple):
    present: int
    binary: int
    encodings: dict[str, int]
    types: dict[str | None, int]
    sizes: dict[int, int]  # body size -> sides
    checks: dict[int, Side]  # BASE64 text sides by index in the block, for `Stats.check_side`
    column_encodings: list[str]  # of the sides present, in order


#: (records counted, lines in the block, records per hour, earliest, latest, sides, problems)
_Sides = list[tuple[str, _Counted]]
_Result = tuple[int, int, dict[dt.datetime, int], dt.datetime, dt.datetime, _Sides, _Found]


def _count(sel: Selection, ref: FileRef, first: int, block: bytes, limit: int | None) -> _Result | None:
    """What the block adds, or None when only the per-record path can tell it exactly. The work is
    C-level passes over columns (`map` with attribute getters, `Counter`, list comparisons)."""
    parts = block.split(b"\n")
    parts.pop()  # a block ends with a newline
    # Line by line, as the per-record path: `decode_lines` would also take a line holding two
    # records, or one record over two lines, and skip a line of spaces.
    lines = DECODER.lines(parts)
    del parts
    in_block = len(lines)
    times = list(map(_TIME, lines))
    if not canonical(times):
        return None
    keep = _selected(sel, lines, times)
    if keep is not None:
        lines = [lines[i] for i in keep]
        times = [times[i] for i in keep]
    if limit is not None and len(lines) > limit:
        lines, times = lines[:limit], times[:limit]
    found = _Found([], [first + i for i in keep] if keep is not None else None, first)
    n = len(lines)
    if not n:
        return 0, in_block, {}, _EPOCH, _EPOCH, [], found
    low, high = min(times), max(times)
    per_hour = {low[:13]: n} if low[:13] == high[:13] else collections.Counter(map(_HOUR, times))
    hours = {dt.datetime.strptime(h, "%Y-%m-%dT%H").replace(tzinfo=dt.UTC): k for h, k in per_hour.items()}
    inputs = list(map(_INPUT, lines))
    outputs = list(map(_OUTPUT, lines))
    del lines, times
    ins, outs = _side_counts(inputs), _side_counts(outputs)
    if ins.present == n or outs.present == n:  # no record without a side
        _mismatches(found.found, inputs, outputs, ins, outs)
    else:
        for i, (a, b) in enumerate(zip(inputs, outputs, strict=True)):
            if a is None and b is None:
                found.found.append(("no_side", i, ""))
            elif a is not None and b is not None and a.encoding != b.encoding:
                found.found.append(("encoding_mismatch", i, f"input {a.encoding}, output {b.encoding}"))
    sides = [("input", ins), ("output", outs)]
    return n, in_block, hours, _at(low), _at(high), sides, found


def _mismatches(
    found: list[tuple[str, int, str]],
    inputs: list[BlockSide | None],
    outputs: list[BlockSide | None],
    ins: _Counted,
    outs: _Counted,
) -> None:
    """The records whose input and output encodings differ, when one side is in every record."""
    if ins.present == outs.present == len(inputs):  # both everywhere: compare the two columns
        left, right = ins.column_encodings, outs.column_encodings
        if left != right:
            found.extend(
                ("encoding_mismatch", i, f"input {a}, output {b}")
                for i, (a, b) in enumerate(zip(left, right, strict=True))
                if a != b
            )
        return
    if not ins.present or not outs.present:  # one side only: nothing to compare
        return
    if ins.present == len(inputs):
        full, partial = ins.column_encodings, outputs
        found.extend(
            ("encoding_mismatch", i, f"input {full[i]}, output {s.encoding}")
            for i, s in enumerate(partial)
            if s is not None and s.encoding != full[i]
        )
    else:
        full, partial = outs.column_encodings, inputs
        found.extend(
            ("encoding_mismatch", i, f"input {s.encoding}, output {full[i]}")
            for i, s in enumerate(partial)
            if s is not None and s.encoding != full[i]
        )


def _side_counts(column: list[BlockSide | None]) -> _Counted:
    present: list[BlockSide] = list(filter(None, column))
    encodings_column = list(map(_ENCODING, present))
    encodings = _tally(encodings_column)
    text_sides = present if BASE64 not in encodings else [s for s in present if s.encoding != BASE64]
    texts = list(map(_DATA, text_sides))
    if all(map(str.isascii, texts)):
        sizes = collections.Counter(map(len, texts))
    else:
        sizes = collections.Counter(len(d.encode("utf-8", "surrogatepass")) for d in texts)
    del texts
    binary = 0
    checks: dict[int, Side] = {}
    for i, s in enumerate(column) if BASE64 in encodings else ():
        if s is None or s.encoding != BASE64:
            continue
        data = base64.b64decode(s.data, validate=True)
        sizes[len(data)] += 1
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            binary += 1
            continue
        checks[i] = Side(s.observedContentType, BASE64, data, False)
    types = _tally(list(map(_CONTENT_TYPE, present)))
    return _Counted(len(present), binary, encodings, types, sizes, checks, encodings_column)


def _tally(values: list[_V]) -> dict[_V, int]:
    """Counts of `values`: a model server's block holds one value a column (one encoding, one
    content type), which `list.count` confirms without hashing every item."""
    if values and values.count(values[0]) == len(values):
        return {values[0]: len(values)}
    return collections.Counter(values)


_V = TypeVar("_V")
_TIME = operator.attrgetter("eventMetadata.inferenceTime")
_INPUT = operator.attrgetter("captureData.endpointInput")
_OUTPUT = operator.attrgetter("captureData.endpointOutput")
_ENCODING = operator.attrgetter("encoding")
_DATA = operator.attrgetter("data")
_CONTENT_TYPE = operator.attrgetter("observedContentType")
_HOUR = operator.itemgetter(slice(0, 13))
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


#: A local read of at least this many bytes of lines is split over worker processes (`count`).
PARALLEL_BYTES = 64 << 20
#: The same for S3: a spawned worker costs ~0.9 CPU s (imports, an S3 client). Two workers
#: against one (bench/read_s3.py, 2 cores): x0.72 at 126 MB of lines, x1.21 at 253 MB, x1.75 at
#: 632 MB.
S3_PARALLEL_BYTES = 256 << 20
#: A zstd object holds about this many times its size in lines (capture lines compress 5 to 10
#: times at level 3), for `PARALLEL_BYTES`.
ZSTD_RATIO = 8
#: At most this many worker processes.
MAX_WORKERS = 4
#: The files are cut into this many runs per worker process.
TASKS_PER_WORKER = 16


#: `on_progress(files, records)`: that many more files were started and records counted.
OnProgress = Callable[[int, int], None]


def count(
    source: Source,
    listing: Listing,
    stats: Stats,
    limit: int | None = None,
    *,
    workers: int | None = None,
    on_progress: OnProgress | None = None,
) -> int:
    """Every selected record of `listing`'s files into `stats`, a block at a time; how many.
    `on_progress` hears of each block (one process), or of each run of files a worker finished.

    A large read (no `limit`) is split over `workers` processes (default: the CPUs this process may
    run on, at most `MAX_WORKERS`), which count contiguous runs of files of about equal size (from
    S3, each downloading its own run `sources.AHEAD` objects ahead); the counts are merged in key
    order, so the report is the one a single pass gives.
    """
    files = listing.files
    if workers is None:
        workers = default_workers(
            files, PARALLEL_BYTES if isinstance(source, LocalSource) else S3_PARALLEL_BYTES
        )
    workers = min(workers, len(files))
    if workers > 1 and limit is None and isinstance(source, LocalSource | S3Source):
        return _in_parallel(source, files, stats, workers, on_progress)
    return _count_files(source, files, stats, limit, on_progress)


def default_workers(files: list[FileRef], threshold: int = PARALLEL_BYTES) -> int:
    """1 for a read of less than `threshold` bytes of lines, else the CPUs (at most `MAX_WORKERS`)."""
    lines = sum(f.size * (ZSTD_RATIO if f.relative.endswith(".zst") else 1) for f in files)
    return 1 if lines < threshold else min(_cpus(), MAX_WORKERS)


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _in_parallel(
    source: LocalSource | S3Source,
    files: list[FileRef],
    stats: Stats,
    workers: int,
    on_progress: OnProgress | None,
) -> int:
    """Local files in `TASKS_PER_WORKER` runs per worker, handed out as workers get free (a slower
    core, or a run of smaller records, does not hold the others up); S3 objects in one run per
    worker (each run opens an S3 client, whose making costs ~0.2 s). Merged in key order."""
    runs = workers * TASKS_PER_WORKER if isinstance(source, LocalSource) else workers
    groups = _split(files, runs)
    context = multiprocessing.get_context(_start_method(source))
    counted = 0
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = pool.map(_worker, [(source, group, stats.selection) for group in groups])
        for group, part in zip(groups, parts, strict=True):
            stats.merge(part)
            counted += part.records_counted
            if on_progress is not None:
                on_progress(len(group), part.records_counted)
    return counted


def _start_method(source: Source) -> str:
    """fork for a local read in a process running no other thread: a forked child starts at once.
    Else spawn: forking copies the locks other threads hold, and an S3 read's child would create
    TLS contexts under OpenSSL locks its parent's finished listing thread left behind (a child
    hung in `SSL_CTX_new`, in tests/test_read.py)."""
    if (
        isinstance(source, LocalSource)
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    ):
        return "fork"
    return "spawn"


def _split(files: list[FileRef], parts: int) -> list[list[FileRef]]:
    """Contiguous runs of about equal bytes, in order."""
    total = sum(f.size for f in files) or 1
    groups: list[list[FileRef]] = [[]]
    done = 0
    for f in files:
        if groups[-1] and done >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append(f)
        done += f.size
    return groups


def _worker(job: tuple[LocalSource | S3Source, list[FileRef], Selection]) -> Stats:
    source, files, selection = job
    stats = Stats(selection)
    _count_files(source, files, stats, None, None)
    return stats


def _count_files(
    source: Source, files: list[FileRef], stats: Stats, limit: int | None, on_progress: OnProgress | None
) -> int:
    taken = 0
    last: FileRef | None = None
    first = 1
    for ref, block in blocks(source, files):
        new_file = ref is not last
        if new_file:
            last, first = ref, 1
        if isinstance(block, BaseException):
            stats.on_problem(BAD_OBJECT, ref.key, f"{block} (after {first - 1} line(s))")
            continue
        n, lines = add_block(stats, ref, first, block, None if limit is None else limit - taken)
        taken += n
        first += lines
        if on_progress is not None:
            on_progress(new_file, n)
        if limit is not None and taken >= limit:
            break
    return taken


def _selected(sel: Selection, lines: list[Line], times: list[str]) -> list[int] | None:
    """Indexes of the records the selection takes by time and inference id; None: all."""
    if sel.start is None and sel.end is None and sel.inference_ids is None:
        return None
    low = _canonical_ceil(sel.start) if sel.start is not None else ""
    high = _canonical_ceil(sel.end) if sel.end is not None else "~"
    ids = sel.inference_ids
    return [
        i
        for i, t in enumerate(times)
        if low <= t < high and (ids is None or lines[i].eventMetadata.inferenceId in ids)
    ]


def _canonical_ceil(when: dt.datetime) -> str:
    """The canonical text of `when` rounded up to a whole second: for whole-second record times t,
    t >= when exactly when text(t) >= this, and t < when exactly when text(t) < this."""
    seconds = math.ceil(when.timestamp())
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _slowly(stats: Stats, ref: FileRef, first: int, block: bytes, limit: int | None) -> int:
    """The per-record path for a block the fast one cannot take exactly."""
    taken = 0
    for offset, line in enumerate(block.split(b"\n")[:-1]):
        number = first + offset
        try:
            c = parse_line(line, ref.place.endpoint, ref.place.variant, ref.key, number)
        except LineError as exc:
            stats.on_problem(BAD_LINE, f"{ref.key}:{number}", str(exc))
            continue
        if not stats.selection.wants_record(c.inference_time, c.inference_id):
            continue
        if limit is not None and taken >= limit:
            break
        stats.add(c)
        taken += 1
    return taken
