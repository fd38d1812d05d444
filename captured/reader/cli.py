"""`captured read SOURCE ...`: captures back as JSON lines, stored lines, statistics or a check.

Output goes to stdout; problems found in the data go to stderr as they are met (and into the
statistics); progress goes to stderr only when it is a terminal. Exit status: 0; 1 with
`--validate` when there is any problem; 2 for bad arguments or a source that cannot be listed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import IO

import msgspec

from captured.reader.layout import Selection
from captured.reader.records import Capture, LineError, document, parse_stored, parse_time
from captured.reader.sources import Listing, Source
from captured.reader.stream import captures, lines, open_listing, selection

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "read",
        help="read captures back (ours and SageMaker's; local or S3; plain or zstd)",
        description="Read captures under SOURCE: a directory, file:///dir or s3://bucket[/prefix] (a"
        " daemon's destination or a SageMaker DestinationS3Uri). Hours overlapping [--start, --end) are"
        " read, then records are kept by inferenceTime.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--endpoint", metavar="NAME", help="only this endpoint")
    p.add_argument("--variant", metavar="NAME", help="only this variant")
    p.add_argument("--start", metavar="TIME", help="ISO 8601, UTC when no offset (e.g. 2024-06-01T12:00Z)")
    p.add_argument("--end", metavar="TIME", help="ISO 8601, exclusive")
    p.add_argument("--inference-id", metavar="ID", action="append", help="only this id (repeatable)")
    p.add_argument("--limit", metavar="N", type=int, help="stop after N records")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--raw", action="store_true", help="print the stored lines unchanged")
    out.add_argument("--stats", action="store_true", help="statistics and the problems found")
    out.add_argument("--validate", action="store_true", help="print the problems; exit 1 when there is any")
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        help="--stats / --validate of a large source: worker processes (default: CPUs, at most 4)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="with --stats or --validate: the whole report as one JSON document (for CI pipelines)",
    )
    p.add_argument("--config", metavar="FILE", help="[s3] endpoint_url and region from this configuration")
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (an S3-compatible server)")
    p.add_argument("--region", metavar="NAME", help="S3 region")


def cmd_read(args: argparse.Namespace) -> int:
    if args.json and not (args.stats or args.validate):
        print(
            "captured read: --json goes with --stats or --validate (records are JSON already)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        sel = selection(
            endpoint=args.endpoint,
            variant=args.variant,
            start=args.start,
            end=args.end,
            inference_ids=args.inference_id,
        )
        endpoint_url, region = _s3_settings(args)
        source, listing = open_listing(args.source, sel, endpoint_url=endpoint_url, region=region)
    except (ValueError, OSError) as exc:
        print(f"captured read: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(len(listing.files), sys.stderr)
    try:
        if args.stats or args.validate:
            return _stats(source, listing, sel, args, progress)
        if args.raw:
            _raw(source, listing, sel, args.limit, progress)
        else:
            _documents(source, listing, sel, args.limit, progress)
    except BrokenPipeError:  # `captured read ... | head`: the reader of stdout has gone
        sys.stderr.close()
    finally:
        progress.done()
    return 0


def _s3_settings(args: argparse.Namespace) -> tuple[str | None, str | None]:
    endpoint_url, region = args.endpoint_url, args.region
    if args.config is not None:
        from captured.service.config import load_config

        s3 = load_config(args.config).s3
        endpoint_url = endpoint_url or s3.endpoint_url
        region = region or s3.region
    return endpoint_url, region


def _problem(kind: str, key: str, detail: str) -> None:
    print(f"captured read: {key}: {kind}: {detail}", file=sys.stderr)


def _documents(
    source: Source, listing: Listing, sel: Selection, limit: int | None, progress: Progress
) -> None:
    out = sys.stdout.buffer
    encode = msgspec.json.Encoder().encode
    for count, c in enumerate(_counted(captures(source, listing, sel, _problem), progress), 1):
        out.write(encode(document(c)) + b"\n")
        if limit is not None and count >= limit:
            break
    out.flush()


def _raw(source: Source, listing: Listing, sel: Selection, limit: int | None, progress: Progress) -> None:
    """The stored lines unchanged, of the records the selection takes."""
    out = sys.stdout.buffer
    count = 0
    for ref, number, line in lines(source, listing.files, _problem):
        progress.file(ref.key)
        try:
            stored = parse_stored(line)
            when = parse_time(stored.eventMetadata.inferenceTime)
        except LineError as exc:
            _problem("invalid_line", f"{ref.key}:{number}", str(exc))
            continue
        if not sel.wants_record(when, stored.eventMetadata.inferenceId):
            continue
        out.write(line + b"\n")
        count += 1
        progress.record()
        if limit is not None and count >= limit:
            break
    out.flush()


def _stats(
    source: Source, listing: Listing, sel: Selection, args: argparse.Namespace, progress: Progress
) -> int:
    from captured.reader import batch
    from captured.reader.lint import Stats
    from captured.reader.report import format_problems, format_report
    from captured.service.process import tune_malloc

    # A read cut short by --limit never reached the later hours: they are not "empty".
    stats = Stats(sel if args.limit is None else msgspec.structs.replace(sel, start=None, end=None))
    stats.listing(listing)
    tune_malloc()  # this process and its workers reuse the blocks' memory instead of faulting it in
    batch.count(source, listing, stats, args.limit, workers=args.workers, on_progress=progress.add)
    report = stats.report()
    progress.done()
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        sys.stdout.write(format_problems(report) if args.validate else format_report(report))
    sys.stdout.flush()
    return EXIT_PROBLEMS if args.validate and report.problems else 0


def _counted(items: Iterator[Capture], progress: Progress) -> Iterator[Capture]:
    last = ""
    for c in items:
        if c.key != last:
            last = c.key
            progress.file(c.key)
        progress.record()
        yield c


class Progress:
    """Files and records done and the rate, on one line of a terminal; silent otherwise."""

    EVERY_S = 0.5

    def __init__(self, files: int, out: IO[str]) -> None:
        self.out = out
        self.on = out.isatty()
        self.files_total = files
        self.files = self.records = 0
        self.started = self.shown = time.monotonic()
        self.width = 0  # of the longest line shown

    def file(self, key: str) -> None:
        self.files += 1

    def record(self) -> None:
        self.records += 1
        if self.on and self.records % 1024 == 0:
            self._show()

    def add(self, files: int, records: int) -> None:
        """`files` more files started and `records` more records counted (`--stats`)."""
        self.files += files
        self.records += records
        if self.on:
            self._show()

    def _show(self) -> None:
        if (now := time.monotonic()) - self.shown >= self.EVERY_S:
            self.shown = now
            rate = self.records / max(now - self.started, 1e-9)
            line = f"{self.files}/{self.files_total} files, {self.records} records, {rate:,.0f}/s "
            self.out.write("\r" + line)
            self.out.flush()
            self.width = max(self.width, len(line))

    def done(self) -> None:
        """Clear the line, if one was shown."""
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
        self.on = False
        self.width = 0
