"""A small S3-compatible server that keeps objects in memory: the stand-in for a remote S3.

moto (the S3 server of the tests) is a faithful but expensive Python implementation: on the
2-core bench machine it burns 2-3 CPU seconds to store 270 MB, CPU that a real, remote S3 never
takes from the host. This server answers the part of the S3 REST API that captured's uploader
and the bench's line count use, with as little work as an HTTP server can do: aiohttp on
uvloop, bodies kept as they arrive, the CRC32 a client sends checked (zlib), no signatures.

    PUT    /bucket                                   CreateBucket
    PUT    /bucket/key                               PutObject (x-amz-checksum-crc32 checked)
    POST   /bucket/key?uploads                       CreateMultipartUpload
    PUT    /bucket/key?partNumber=N&uploadId=U       UploadPart (checksum checked)
    POST   /bucket/key?uploadId=U                    CompleteMultipartUpload
    DELETE /bucket/key?uploadId=U                    AbortMultipartUpload
    GET    /bucket?uploads                           ListMultipartUploads
    GET    /bucket?list-type=2                       ListObjectsV2 (one page)
    GET    /bucket/key, HEAD /bucket/key             GetObject, HeadObject
    POST   /_sink/reset, GET /_sink/ping             forget everything; "are you there"

`SinkServer` runs it as a child process (`python -m captured.testing.s3sink HOST LIFETIME`) with
the interface of `captured.testing.s3.MotoServer` (port on stdout, exit when stdin closes, a
lifetime cap). bench/ingest.py uses it with `--s3-server sink`. It stands in for a remote S3 in
benchmarks; it is not a faithful test double (no signatures, one-page listings): tests use moto.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import threading
import time
import uuid
import zlib
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from captured.testing.s3 import MotoServer, http_request

if TYPE_CHECKING:
    from aiohttp import web

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _xml(root: str, body: str) -> web.Response:
    """An S3 XML reply."""
    from aiohttp import web

    text = f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NS}">{body}</{root}>'
    return web.Response(body=text.encode(), content_type="application/xml")


class Store:
    """Buckets (key -> body, ETag, mtime) and open multipart uploads (id -> bucket, key, parts)."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, tuple[bytes, str, float]]] = {}
        self.uploads: dict[str, tuple[str, str, dict[int, tuple[bytes, str]]]] = {}

    def reset(self) -> None:
        self.buckets.clear()
        self.uploads.clear()


def _error(status: int, code: str, message: str) -> web.Response:
    from aiohttp import web

    body = f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>".encode()
    return web.Response(status=status, body=body, content_type="application/xml")


async def _checked_body(request: web.Request) -> tuple[bytes, web.Response | None]:
    """The request's body, and a 400 BadDigest reply if it carries a CRC32 the body does not have."""
    body: bytes = await request.read()
    sent = request.headers.get("x-amz-checksum-crc32")
    if sent is None:
        return body, None
    mine = base64.b64encode((zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")).decode()
    if sent != mine:
        return body, _error(400, "BadDigest", f"CRC32 {sent} does not match the body's {mine}")
    return body, None


def make_app(store: Store) -> Any:
    from aiohttp import web

    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))

    async def reset(request: web.Request) -> web.Response:
        store.reset()
        return web.Response(text="ok")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="sink")

    async def bucket(request: web.Request) -> web.Response:
        name = request.match_info["bucket"]
        if request.method == "PUT":
            store.buckets.setdefault(name, {})
            return web.Response(headers={"Location": f"/{name}"})
        objects = store.buckets.get(name)
        if objects is None:
            return _error(404, "NoSuchBucket", name)
        if request.method == "HEAD":
            return web.Response()
        if "uploads" in request.query:
            items = "".join(
                f"<Upload><Key>{escape(key)}</Key><UploadId>{uid}</UploadId>"
                f"<Initiated>{iso(time.time())}</Initiated></Upload>"
                for uid, (b, key, _) in store.uploads.items()
                if b == name and key.startswith(request.query.get("prefix", ""))
            )
            body = f"<Bucket>{name}</Bucket><IsTruncated>false</IsTruncated>{items}"
            return _xml("ListMultipartUploadsResult", body)
        prefix = request.query.get("prefix", "")
        keys = sorted(k for k in objects if k.startswith(prefix))
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>{iso(objects[k][2])}</LastModified>"
            f"<ETag>{objects[k][1]}</ETag><Size>{len(objects[k][0])}</Size>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for k in keys
        )
        body = (
            f"<Name>{name}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
            f"<MaxKeys>{max(1000, len(keys))}</MaxKeys><IsTruncated>false</IsTruncated>{contents}"
        )
        return _xml("ListBucketResult", body)

    async def obj(request: web.Request) -> web.StreamResponse:
        name, key = request.match_info["bucket"], request.match_info["key"]
        objects = store.buckets.get(name)
        if objects is None:
            return _error(404, "NoSuchBucket", name)
        q = request.query
        if request.method == "POST" and "uploads" in q:
            uid = uuid.uuid4().hex
            store.uploads[uid] = (name, key, {})
            body = f"<Bucket>{name}</Bucket><Key>{escape(key)}</Key><UploadId>{uid}</UploadId>"
            return _xml("InitiateMultipartUploadResult", body)
        if "uploadId" in q:
            upload = store.uploads.get(q["uploadId"])
            if upload is None:
                return _error(404, "NoSuchUpload", q["uploadId"])
            parts = upload[2]
            if request.method == "PUT":
                data, bad = await _checked_body(request)
                if bad is not None:
                    return bad
                etag = f'"{zlib.crc32(data):08x}{len(parts):04x}"'
                parts[int(q["partNumber"])] = (data, etag)
                return web.Response(headers={"ETag": etag})
            if request.method == "DELETE":
                del store.uploads[q["uploadId"]]
                return web.Response(status=204)
            # POST: complete, from the part numbers the client lists
            listed = (await request.text()).split("<PartNumber>")[1:]
            numbers = [int(p.split("<", 1)[0]) for p in listed]
            if any(n not in parts for n in numbers):
                return _error(400, "InvalidPart", "a listed part was not uploaded")
            data = b"".join(parts[n][0] for n in numbers)
            etag = f'"{zlib.crc32(data):08x}-{len(numbers)}"'
            objects[key] = (data, etag, time.time())
            del store.uploads[q["uploadId"]]
            body = f"<Bucket>{name}</Bucket><Key>{escape(key)}</Key><ETag>{escape(etag)}</ETag>"
            return _xml("CompleteMultipartUploadResult", body)
        if request.method == "PUT":
            data, bad = await _checked_body(request)
            if bad is not None:
                return bad
            etag = f'"{zlib.crc32(data):08x}"'
            objects[key] = (data, etag, time.time())
            return web.Response(headers={"ETag": etag})
        found = objects.get(key)
        if found is None:
            return _error(404, "NoSuchKey", key)
        data, etag, mtime = found
        modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(mtime))
        headers = {"ETag": etag, "Last-Modified": modified}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        if request.method == "DELETE":
            del objects[key]
            return web.Response(status=204)
        return web.Response(body=data, headers=headers, content_type="binary/octet-stream")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/_sink/reset", reset)
    app.router.add_get("/_sink/ping", ping)
    app.router.add_route("*", "/{bucket}", bucket)
    app.router.add_route("*", "/{bucket}/{key:.+}", obj)
    return app


def serve(host: str, max_lifetime: float) -> None:
    """The child: serve on a free port, print it, exit when stdin closes or the time is up."""
    import uvloop
    from aiohttp import web

    threading.Timer(max_lifetime, os._exit, (3,)).start()

    async def main() -> None:
        runner = web.AppRunner(make_app(Store()), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        sys.stdout.write(f"{port}\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.buffer.read)  # until the parent closes it
        os._exit(0)

    uvloop.run(main())


class SinkServer(MotoServer):
    """This module's server in a child process, with `MotoServer`'s interface."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "captured.testing.s3sink", self.host, str(self.max_lifetime)]

    def answers(self) -> bool:
        return http_request(self.host, self.port, "GET", "/_sink/ping", timeout=2.0) == (200, b"sink")

    def reset(self) -> None:
        status, body = http_request(self.host, self.port, "POST", "/_sink/reset")
        if status != 200:
            raise RuntimeError(f"sink reset failed: {status} {body!r}")


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]))
