"""Where a read finds capture files: a local directory or an S3 prefix (the thin I/O shell).

Both list the files of a `Selection` in key order (`Listing`: the capture files, and the keys
outside the layout) and hand out each file's bytes. S3 goes through aiobotocore and the standard
AWS credential chain on an event loop of its own (a background thread): the listing runs first,
then up to `AHEAD` objects download concurrently ahead of the consumer, in key order, so memory
stays bounded by about `AHEAD` objects whatever the prefix holds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from captured.reader.layout import Place, Selection, hour_prefix, place

if TYPE_CHECKING:
    import asyncio  # the S3 source imports it when it runs: a local read starts ~50 ms sooner

#: Objects downloaded ahead of the consumer (S3).
AHEAD = 4
#: Hour prefixes listed one by one (S3) when endpoint, variant and a window this short are given;
#: longer windows list the variant's prefix whole.
MAX_HOUR_PREFIXES = 24 * 62
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileRef:
    key: str  # what the records' `key` says: the object key, or the file's path
    relative: str  # relative to the source's root
    place: Place
    size: int


@dataclass(slots=True)
class Listing:
    files: list[FileRef] = field(default_factory=list)
    #: Keys under the root that are not capture files of the layout.
    outside: list[str] = field(default_factory=list)


class Source(Protocol):
    root: str

    def listing(self, selection: Selection) -> Listing: ...

    def contents(self, files: list[FileRef]) -> Iterator[tuple[FileRef, Iterator[bytes]]]:
        """Each file of `files`, in order, with its bytes in chunks (an OSError for one file
        surfaces while its chunks are read)."""
        ...


def open_source(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Source:
    """`s3://bucket[/prefix]`, `file:///dir` or a directory."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r}: no bucket")
        return S3Source(bucket, prefix, endpoint_url=endpoint_url, region=region)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{uri!r} is not a directory")
    return LocalSource(os.path.abspath(path))


class LocalSource:
    def __init__(self, root: str) -> None:
        self.root = root

    def listing(self, selection: Selection) -> Listing:
        out = Listing()
        for dirpath, dirnames, names in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):  # a delivery's temporary file, or the like
                    continue
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, self.root).replace(os.sep, "/")
                p = place(relative)
                if p is None:
                    if _under(relative, selection):
                        out.outside.append(path)
                elif selection.wants_place(p):
                    out.files.append(FileRef(path, relative, p, os.lstat(path).st_size))
        out.files.sort(key=lambda f: f.relative)
        return out

    def contents(self, files: list[FileRef]) -> Iterator[tuple[FileRef, Iterator[bytes]]]:
        for ref in files:
            yield ref, _file_chunks(ref.key)


def _under(relative: str, selection: Selection) -> bool:
    """Whether a key outside the layout lies under the endpoint / variant a selection names (as
    an S3 listing of that prefix would find it)."""
    if selection.endpoint is None:
        return True
    prefix = selection.endpoint + "/" + (selection.variant + "/" if selection.variant is not None else "")
    return relative.startswith(prefix)


def _file_chunks(path: str) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with open(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


class S3Source:
    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None, region: str | None) -> None:
        self.bucket = bucket
        self.prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self.root = f"s3://{bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url
        self.region = region

    def listing(self, selection: Selection) -> Listing:
        listing: Listing = _run(self._listing(selection))
        return listing

    async def _listing(self, selection: Selection) -> Listing:
        out = Listing()
        async with self._client() as client:
            for prefix in self._prefixes(selection):
                paginator = client.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        key = obj["Key"]
                        relative = key[len(self.prefix) :]
                        p = place(relative)
                        if p is None:
                            out.outside.append(key)
                        elif selection.wants_place(p):
                            out.files.append(FileRef(key, relative, p, int(obj["Size"])))
        out.files.sort(key=lambda f: f.relative)
        return out

    def _prefixes(self, selection: Selection) -> list[str]:
        base = self.prefix
        if selection.endpoint is None:
            return [base]
        base += selection.endpoint + "/"
        if selection.variant is None:
            return [base]
        base += selection.variant + "/"
        hours = selection.hours(MAX_HOUR_PREFIXES)
        return [base] if hours is None else [base + hour_prefix(h) for h in hours]

    def contents(self, files: list[FileRef]) -> Iterator[tuple[FileRef, Iterator[bytes]]]:
        """Objects downloaded `AHEAD` at a time on a background event loop, handed out in order."""
        results: queue.Queue[tuple[FileRef, bytes | BaseException] | None] = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        work = self._download(files, results, stop)
        import asyncio

        thread = threading.Thread(target=asyncio.run, args=(work,), name="captured-read", daemon=True)
        thread.start()
        try:
            while (item := results.get()) is not None:
                ref, body = item
                yield ref, _body_chunks(body)
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    results.get_nowait()  # let a producer blocked on a full queue see `stop`
            thread.join(timeout=30)

    async def _download(
        self,
        files: list[FileRef],
        results: queue.Queue[tuple[FileRef, bytes | BaseException] | None],
        stop: threading.Event,
    ) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            async with self._client() as client:
                window: list[asyncio.Task[bytes]] = []
                pending = iter(files)
                refs: list[FileRef] = []

                def more() -> None:
                    while len(window) < AHEAD and (ref := next(pending, None)) is not None:
                        refs.append(ref)
                        window.append(asyncio.ensure_future(self._get(client, ref.key)))

                more()
                while window and not stop.is_set():
                    task, ref = window.pop(0), refs.pop(0)
                    try:
                        body: bytes | BaseException = await task
                    except Exception as exc:
                        body = exc
                    more()
                    while not stop.is_set():
                        try:
                            put = functools.partial(results.put, (ref, body), timeout=0.2)
                            await loop.run_in_executor(None, put)
                            break
                        except queue.Full:
                            continue
                for task in window:
                    task.cancel()
        finally:
            with contextlib.suppress(queue.Full):
                results.put(None, timeout=5)

    async def _get(self, client: Any, key: str) -> bytes:
        response = await client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as stream:
            data: bytes = await stream.read()
        return data

    def _client(self) -> Any:
        from aiobotocore.session import get_session

        return get_session().create_client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


def _body_chunks(body: bytes | BaseException) -> Iterator[bytes]:
    if isinstance(body, BaseException):
        raise OSError(f"download failed: {body}") from body
    for i in range(0, len(body), CHUNK):
        yield body[i : i + CHUNK]


def _run(coro: Any) -> Any:
    """Run `coro` on a fresh event loop in a thread (the caller may be inside a loop itself)."""
    out: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        import asyncio

        try:
            out.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=target, name="captured-read-list", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return out[0]
