"""Reading captures back: files in key order, lines in file order, each parsed and selected.

`read()` is the Python API (`captured.reader`); `captured read` prints what it yields. Whatever is
wrong in the data is reported, never raised: a line that is not a capture record, a truncated or
corrupt zstd object, a file that cannot be read. Each goes to `on_problem(kind, key, detail)`
(default: a warning in the log) and the read goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator

import zstandard

from captured.reader.layout import Selection, parse_when
from captured.reader.records import Capture, LineError, parse_line
from captured.reader.sources import FileRef, Listing, Source, open_source

log = logging.getLogger("captured.reader")

# Problem kinds reported while reading (the linter, `stats`, adds its own).
BAD_LINE = "invalid_line"
BAD_OBJECT = "unreadable_file"

Problem = Callable[[str, str, str], None]


def _warn(kind: str, key: str, detail: str) -> None:
    log.warning("%s: %s: %s", key, kind, detail)


def selection(
    *,
    endpoint: str | None = None,
    variant: str | None = None,
    start: str | dt.datetime | None = None,
    end: str | dt.datetime | None = None,
    inference_ids: Iterable[str] | None = None,
) -> Selection:
    return Selection(
        start=parse_when(start),
        end=parse_when(end),
        endpoint=endpoint,
        variant=variant,
        inference_ids=frozenset(inference_ids) if inference_ids is not None else None,
    )


def read(
    source: str,
    *,
    endpoint: str | None = None,
    variant: str | None = None,
    start: str | dt.datetime | None = None,
    end: str | dt.datetime | None = None,
    inference_ids: Iterable[str] | None = None,
    limit: int | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    on_problem: Problem = _warn,
) -> Iterator[Capture]:
    """The captures under `source` (`s3://bucket[/prefix]`, `file:///dir` or a directory) that the
    selection takes, in key order and within a file in line order, streamed.

    `start` / `end`: ISO 8601 (UTC when no offset) or aware datetimes; hours overlapping
    [start, end) are read, then records are kept by `inferenceTime`. `inference_ids`: only these.
    """
    sel = selection(endpoint=endpoint, variant=variant, start=start, end=end, inference_ids=inference_ids)
    src = open_source(source, endpoint_url=endpoint_url, region=region)
    for count, capture in enumerate(captures(src, src.listing(sel), sel, on_problem), 1):
        yield capture
        if limit is not None and count >= limit:
            return


def captures(source: Source, listing: Listing, sel: Selection, on_problem: Problem) -> Iterator[Capture]:
    """Every selected record of the files of `listing`."""
    for ref, number, line in lines(source, listing.files, on_problem):
        try:
            c = parse_line(line, ref.place.endpoint, ref.place.variant, ref.key, number)
        except LineError as exc:
            on_problem(BAD_LINE, f"{ref.key}:{number}", str(exc))
            continue
        if sel.wants_record(c.inference_time, c.inference_id):
            yield c


def lines(source: Source, files: list[FileRef], on_problem: Problem) -> Iterator[tuple[FileRef, int, bytes]]:
    """(file, 1-based line number, line without its newline) of every file, in order."""
    for ref, chunks in source.contents(files):
        number = 0
        try:
            data = decompressed(chunks) if ref.relative.endswith(".zst") else chunks
            for line in _split(data):
                number += 1
                yield ref, number, line
        except (OSError, zstandard.ZstdError, Truncated) as exc:
            on_problem(BAD_OBJECT, ref.key, f"{exc} (after {number} line(s))")


class Truncated(Exception):
    pass


def decompressed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """One zstd frame, streamed; a truncated frame or bytes after it raise (zstandard's stream
    readers end silently at a truncated frame, so `eof` is checked here)."""
    obj = zstandard.ZstdDecompressor().decompressobj()
    for chunk in chunks:
        if obj.eof:
            raise Truncated("bytes after the end of the zstd frame")
        out = obj.decompress(chunk)
        if out:
            yield out
    if not obj.eof:
        raise Truncated("truncated zstd frame")


def _split(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream, without their newlines; a last line without one is still a line."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        parts = data.split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def open_listing(
    source: str, sel: Selection, *, endpoint_url: str | None = None, region: str | None = None
) -> tuple[Source, Listing]:
    src = open_source(source, endpoint_url=endpoint_url, region=region)
    return src, src.listing(sel)
