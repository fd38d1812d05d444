"""`CaptureMiddleware` (ASGI 3) with the frameworks' own test clients and a real uvicorn.

The daemon runs in the test's loop (`run_daemon`); the framework's `TestClient` (its own thread
and loop) drives the app in a worker thread; what the daemon delivered is read back and compared,
field by field, with what was sent and answered. `stats()` is checked to add up in every test:
seen = captured + sum(skipped) + in_flight.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from captured.middleware import CaptureMiddleware
from captured.middleware.common import MiddlewareStats
from captured.service.status import Status
from captured.testing.inprocess import FakeClock, delivered_lines, run_daemon, write_config

T = TypeVar("T")


def with_daemon(root: Path, body: Callable[[str], T]) -> tuple[T, list[dict[str, Any]], Status]:
    """Run the daemon, call `body(socket_path)` in a worker thread, stop the daemon (it seals and
    delivers); return what `body` returned, the delivered lines and the last status."""
    cfg = write_config(root)

    async def main() -> tuple[T, Status]:
        async with run_daemon(cfg, clock=FakeClock()) as daemon:
            result = await asyncio.to_thread(body, cfg.socket_path)
            return result, daemon.status()

    result, status = asyncio.run(main())
    return result, delivered_lines(root), status


def adds_up(st: MiddlewareStats, **expected: Any) -> None:
    assert st.seen == st.captured + sum(st.skipped.values()) + st.in_flight
    for key, value in expected.items():
        assert getattr(st, key) == value, (key, st)


def side(line: dict[str, Any], name: str) -> tuple[str | None, str, bytes]:
    """(observedContentType, encoding, data as bytes) of one side of a delivered line."""
    s = line["captureData"][name]
    data = base64.b64decode(s["data"]) if s["encoding"] == "BASE64" else s["data"].encode()
    return s["observedContentType"], s["encoding"], data


# --- the app under test ------------------------------------------------------------------------------


async def invocations(request: Request) -> Response:
    body = await request.body()
    if request.headers.get("content-type") == "application/json":
        return JSONResponse({"score": len(json.loads(body)["features"])})
    return PlainTextResponse(f"{sum(float(x) for x in body.split(b','))}\n", media_type="text/csv")


async def stream(request: Request) -> StreamingResponse:
    await request.body()

    async def events() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"data: token {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(events(), media_type="text/event-stream")


async def pieces(request: Request) -> Response:
    sizes = [len(chunk) async for chunk in request.stream()]
    return PlainTextResponse(",".join(map(str, sizes)), media_type="text/csv")


async def unread(request: Request) -> Response:
    return PlainTextResponse("ignored\n", media_type="text/csv")


async def boom(request: Request) -> Response:
    await request.body()
    raise RuntimeError("the model broke")


async def fail(request: Request) -> Response:
    return PlainTextResponse("bad input\n", status_code=500, media_type="text/csv")


async def big(request: Request) -> Response:
    return PlainTextResponse("x" * 5000, media_type="text/csv")


async def ping(request: Request) -> Response:
    return Response(b"", status_code=200)


ROUTES = [
    Route("/invocations", invocations, methods=["POST"]),
    Route("/stream", stream, methods=["POST"]),
    Route("/pieces", pieces, methods=["POST"]),
    Route("/unread", unread, methods=["POST"]),
    Route("/boom", boom, methods=["POST"]),
    Route("/fail", fail, methods=["POST"]),
    Route("/big", big, methods=["POST"]),
    Route("/ping", ping, methods=["GET", "POST"]),
    Route("/other", invocations, methods=["POST"]),
]


def starlette_app(socket_path: str, **options: Any) -> tuple[Starlette, CaptureMiddleware]:
    app = Starlette(routes=ROUTES)
    middleware = CaptureMiddleware(app, socket_path=socket_path, **options)
    return app, middleware


# --- tests -----------------------------------------------------------------------------------------------


def test_fastapi_json_and_csv_bodies_are_captured_as_sent_and_answered(short_tmp: Path) -> None:
    """FastAPI's own `add_middleware`: the middleware's AsyncCaptureClient lives on the app's
    loop and is flushed at the lifespan's shutdown (leaving the `with` block)."""
    made: list[CaptureMiddleware] = []

    def body(socket_path: str) -> list[Any]:
        app = FastAPI(openapi_url=None)

        @app.post("/invocations")
        async def route(request: Request) -> Response:
            return await invocations(request)

        class Recorder(CaptureMiddleware):
            def __init__(self, app: Any, **kw: Any) -> None:
                super().__init__(app, **kw)
                made.append(self)

        app.add_middleware(Recorder, socket_path=socket_path)
        with TestClient(app) as tc:
            a = tc.post(
                "/invocations",
                content=b'{"features": [1, 2, 3]}',
                headers={"content-type": "application/json"},
            )
            b = tc.post("/invocations", content=b"1,2,3.5", headers={"content-type": "text/csv"})
        return [(a.status_code, a.content), (b.status_code, b.content)]

    answers, lines, _ = with_daemon(short_tmp, body)
    assert answers == [(200, b'{"score":3}'), (200, b"6.5\n")]
    by_input = {side(line, "endpointInput")[2]: line for line in lines}
    assert set(by_input) == {b'{"features": [1, 2, 3]}', b"1,2,3.5"}
    json_line, csv_line = by_input[b'{"features": [1, 2, 3]}'], by_input[b"1,2,3.5"]
    assert side(json_line, "endpointInput")[:2] == ("application/json", "JSON")
    assert side(json_line, "endpointOutput") == ("application/json", "JSON", b'{"score":3}')
    assert side(csv_line, "endpointInput")[:2] == ("text/csv", "CSV")
    assert side(csv_line, "endpointOutput") == ("text/csv; charset=utf-8", "CSV", b"6.5\n")
    adds_up(made[0].stats(), seen=2, captured=2, skipped={}, in_flight=0)


def test_a_streamed_response_passes_chunk_by_chunk_and_is_captured_whole(short_tmp: Path) -> None:
    def body(socket_path: str) -> tuple[list[bytes], MiddlewareStats]:
        _app, mw = starlette_app(socket_path)
        with TestClient(mw) as tc, tc.stream("POST", "/stream", content=b"prompt") as r:
            chunks = list(r.iter_raw())
        return chunks, mw.stats()

    (chunks, st), lines, _ = with_daemon(short_tmp, body)
    whole = b"".join(f"data: token {i}\n\n".encode() for i in range(5))
    assert b"".join(chunks) == whole
    (line,) = lines
    assert side(line, "endpointOutput") == ("text/event-stream; charset=utf-8", "BASE64", whole)
    assert side(line, "endpointInput")[2] == b"prompt"
    adds_up(st, seen=1, captured=1)


def test_each_body_message_goes_on_before_the_app_makes_the_next() -> None:
    """No buffering on the way out, at the ASGI level: when the app's `send` of a chunk returns,
    the server has that chunk; messages, headers and the trailing empty body are unchanged."""
    seen: list[dict[str, Any]] = []
    client = _ListClient()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")], "trailers": False})  # fmt: skip
        for i, chunk in enumerate((b"ab", b"cd", b"ef")):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            assert seen[-1]["body"] == chunk and len(seen) == 2 + i  # already at the server
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def main() -> None:
        mw = CaptureMiddleware(app, client=client)
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-type", b"text/csv")],
        }
        await mw(
            scope, _messages({"type": "http.request", "body": b"1,2", "more_body": False}), _append(seen)
        )
        assert seen[0]["headers"] == [(b"content-type", b"text/plain"), (b"content-length", b"6")]
        assert [m.get("body") for m in seen[1:]] == [b"ab", b"cd", b"ef", b""]
        adds_up(mw.stats(), seen=1, captured=1)

    asyncio.run(main())
    assert client.captured == [
        ((b"1,2", b"abcdef"), {"request_content_type": "text/csv", "response_content_type": "text/plain"})
    ]


def test_a_request_body_read_in_pieces_or_not_at_all(short_tmp: Path) -> None:
    def body(socket_path: str) -> tuple[bytes, bytes, MiddlewareStats]:
        _app, mw = starlette_app(socket_path)

        def upload() -> Any:
            for i in range(4):
                yield f"{i}".encode() * 1000

        with TestClient(mw) as tc:
            a = tc.post("/pieces", content=upload(), headers={"content-type": "text/csv"})
            b = tc.post("/unread", content=b"never read", headers={"content-type": "text/csv"})
        return a.content, b.content, mw.stats()

    (sizes, ignored, st), lines, _ = with_daemon(short_tmp, body)
    assert sum(map(int, sizes.split(b","))) == 4000  # the app got every byte, in its own pieces
    by_output = {side(line, "endpointOutput")[2]: line for line in lines}
    assert side(by_output[sizes], "endpointInput")[2] == b"".join(f"{i}".encode() * 1000 for i in range(4))
    assert "endpointInput" not in by_output[b"ignored\n"]["captureData"]  # what the app read: nothing
    assert ignored == b"ignored\n"
    adds_up(st, seen=2, captured=2)


def test_an_app_that_raises_raises_as_without_the_middleware(short_tmp: Path) -> None:
    def body(socket_path: str) -> tuple[list[str], MiddlewareStats]:
        errors = []
        app, mw = starlette_app(socket_path)
        for target in (app, mw):
            with TestClient(target) as tc, pytest.raises(RuntimeError) as info:
                tc.post("/boom", content=b"1")
            errors.append(f"{type(info.value).__name__}: {info.value}")
        return errors, mw.stats()

    (errors, st), lines, _ = with_daemon(short_tmp, body)
    assert errors == ["RuntimeError: the model broke"] * 2
    assert lines == []
    adds_up(st, seen=1, captured=0, skipped={"app_error": 1})


@pytest.mark.parametrize("capture_errors", [False, True])
def test_a_500_is_captured_only_with_capture_errors(short_tmp: Path, capture_errors: bool) -> None:
    def body(socket_path: str) -> tuple[int, MiddlewareStats]:
        _app, mw = starlette_app(socket_path, capture_errors=capture_errors)
        with TestClient(mw) as tc:
            r = tc.post("/fail", content=b"1,2", headers={"content-type": "text/csv"})
        return r.status_code, mw.stats()

    (status, st), lines, _ = with_daemon(short_tmp, body)
    assert status == 500
    if capture_errors:
        (line,) = lines
        assert side(line, "endpointOutput")[2] == b"bad input\n"
        adds_up(st, seen=1, captured=1)
    else:
        assert lines == []
        adds_up(st, seen=1, captured=0, skipped={"error_status": 1})


def test_excluded_paths_methods_and_paths_are_not_captured(short_tmp: Path) -> None:
    def body(socket_path: str) -> MiddlewareStats:
        _app, mw = starlette_app(socket_path, paths=["/invocations", "/v1/"])
        with TestClient(mw) as tc:
            assert tc.get("/ping").status_code == 200  # GET: not in methods
            assert tc.post("/ping").status_code == 200  # excluded by default
            assert tc.post("/other", content=b"1", headers={"content-type": "text/csv"}).status_code == 200
            assert (
                tc.post("/invocations", content=b"1,2", headers={"content-type": "text/csv"}).status_code
                == 200
            )
        return mw.stats()

    st, lines, _ = with_daemon(short_tmp, body)
    assert [side(line, "endpointInput")[2] for line in lines] == [b"1,2"]
    adds_up(st, seen=4, captured=1, skipped={"method": 1, "excluded": 1, "path": 1})


def test_sagemaker_headers_are_captured_and_bad_ones_left_out_and_counted(short_tmp: Path) -> None:
    sent: list[tuple[dict[str, Any], str]] = [
        ({"X-Amzn-SageMaker-Inference-Id": "req-1", "X-Amzn-SageMaker-Custom-Attributes": "trace=1"}, "1"),
        ({"X-Amzn-SageMaker-Inference-Id": "x" * 65}, "2"),  # too long: left out
        ({"X-Amzn-SageMaker-Inference-Id": " lead"}, "3"),  # a leading space: left out
        ({"X-Amzn-SageMaker-Custom-Attributes": "é=1".encode("latin-1")}, "4"),  # not ASCII: left out
        ({"X-Amzn-SageMaker-Custom-Attributes": "a" * 1025}, "5"),  # over 1024: left out
    ]

    def body(socket_path: str) -> MiddlewareStats:
        _app, mw = starlette_app(socket_path)
        with TestClient(mw) as tc:
            for headers, value in sent:
                r = tc.post(
                    "/invocations", content=value.encode(), headers={"content-type": "text/csv", **headers}
                )
                assert r.status_code == 200
        return mw.stats()

    st, lines, _ = with_daemon(short_tmp, body)
    meta = {side(line, "endpointInput")[2]: line["eventMetadata"] for line in lines}
    assert meta[b"1"]["inferenceId"] == "req-1" and meta[b"1"]["customAttributes"] == "trace=1"
    assert all(
        "inferenceId" not in meta[k] and "customAttributes" not in meta[k] for k in (b"2", b"3", b"4", b"5")
    )
    adds_up(st, seen=5, captured=5, invalid_headers={"inference_id": 2, "custom_attributes": 2})


def test_a_body_over_the_limit_is_answered_in_full_and_not_captured(short_tmp: Path) -> None:
    def body(socket_path: str) -> tuple[bytes, bytes, MiddlewareStats]:
        _app, mw = starlette_app(socket_path, max_body_bytes=1000)
        with TestClient(mw) as tc:
            a = tc.post("/big", content=b"1")
            b = tc.post("/invocations", content=b"1," * 600 + b"1", headers={"content-type": "text/csv"})
        return a.content, b.content, mw.stats()

    (a, b, st), lines, _ = with_daemon(short_tmp, body)
    assert a == b"x" * 5000 and b == b"601.0\n"
    assert lines == []
    adds_up(st, seen=2, captured=0, skipped={"too_large": 2})


def test_a_client_that_disconnects_mid_stream_yields_no_capture() -> None:
    """Starlette's StreamingResponse listens for `http.disconnect` while it streams: the peer goes
    away after the first chunk, the stream stops, and nothing is captured (counted)."""
    client = _ListClient()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive_then_disconnect_queue() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "http.request", "body": b"prompt", "more_body": False}
        await gone.wait()
        yield {"type": "http.disconnect"}

    async def main() -> None:
        app, mw = Starlette(routes=ROUTES), None
        mw = CaptureMiddleware(app, client=client)
        messages = receive_then_disconnect_queue()

        async def receive() -> dict[str, Any]:
            return await messages.__anext__()

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                gone.set()  # the peer leaves after the first chunk

        scope = {"type": "http", "method": "POST", "path": "/stream", "headers": [], "query_string": b"", "server": ("t", 80), "scheme": "http", "root_path": ""}  # fmt: skip
        await asyncio.wait_for(mw(scope, receive, send), 10)
        adds_up(mw.stats(), seen=1, captured=0, skipped={"disconnected": 1})

    asyncio.run(main())
    assert client.captured == []
    assert 1 <= sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) < 5


def test_the_body_limit_is_the_given_clients_and_headers_count_only_when_captured() -> None:
    """With `client=` whose limit is 100 bytes, a 200-byte response is `too_large` (not a failed
    capture); a bad inference id on a request that is not captured (a 500) is not counted."""
    client = _ListClient(max_body_bytes=100)

    async def main() -> MiddlewareStats:
        mw = CaptureMiddleware(Starlette(routes=ROUTES), client=client)
        bad_id = [(b"x-amzn-sagemaker-inference-id", b" bad")]
        for path, body in (("/big", b"1"), ("/fail", b"1"), ("/invocations", b"1,2")):
            scope = {"type": "http", "method": "POST", "path": path, "headers": bad_id, "query_string": b"", "server": ("t", 80), "scheme": "http", "root_path": ""}  # fmt: skip
            await mw(
                scope, _messages({"type": "http.request", "body": body, "more_body": False}), _append([])
            )
        return mw.stats()

    st = asyncio.run(main())
    adds_up(
        st,
        seen=3,
        captured=1,
        skipped={"too_large": 1, "error_status": 1},
        invalid_headers={"inference_id": 1},
    )
    assert [pair for pair, _ in client.captured] == [(b"1,2", b"3.0\n")]
    with pytest.raises(ValueError, match="not both"):
        CaptureMiddleware(Starlette(), socket_path="/x", client=client)


# --- a real uvicorn ----------------------------------------------------------------------------------------

UVICORN_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from captured.middleware import CaptureMiddleware

async def invocations(request):
    body = await request.body()
    return PlainTextResponse(body.decode()[::-1], media_type="text/csv")

app = CaptureMiddleware(
    Starlette(routes=[Route("/invocations", invocations, methods=["POST"])]),
    socket_path=os.environ["CAPTURED_SOCKET"],
)
"""


def test_a_real_uvicorn_server_captures_every_request_once(short_tmp: Path) -> None:
    """uvicorn serving the app over real HTTP, 4 threads x 50 requests with inference ids; at
    SIGTERM the lifespan shutdown flushes the middleware's client: every request arrives once."""
    (short_tmp / "asgi_app.py").write_text(UVICORN_APP)
    port = _free_port()

    def body(socket_path: str) -> list[int]:
        env = {**os.environ, "CAPTURED_SOCKET": socket_path}
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(short_tmp), "--port", str(port), "--log-level", "warning", "asgi_app:app"]  # fmt: skip
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            _wait_listening(port, server)
            statuses: list[int] = []
            lock = threading.Lock()

            def worker(k: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                for i in range(50):
                    rid = f"{k}-{i}"
                    conn.request("POST", "/invocations", body=f"{k},{i}", headers={"Content-Type": "text/csv", "X-Amzn-SageMaker-Inference-Id": rid})  # fmt: skip
                    resp = conn.getresponse()
                    assert resp.read() == f"{k},{i}"[::-1].encode()
                    with lock:
                        statuses.append(resp.status)
                conn.close()

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=30)
        # uvicorn shuts down gracefully, then raises the signal it caught again: -SIGTERM.
        assert server.returncode in (0, -signal.SIGTERM), out.decode(errors="replace")
        return statuses

    statuses, lines, status = with_daemon(short_tmp, body)
    assert statuses == [200] * 200
    ids = sorted(line["eventMetadata"]["inferenceId"] for line in lines)
    assert ids == sorted(f"{k}-{i}" for k in range(4) for i in range(50))
    assert status.counters.received == 200 == status.counters.written


# --- helpers ---------------------------------------------------------------------------------------------


class _ListClient:
    """A capture client that keeps what it is given (for ASGI-level tests with no daemon)."""

    def __init__(self, max_body_bytes: int = 6 * 1024 * 1024) -> None:
        self.captured: list[tuple[tuple[Any, Any], dict[str, Any]]] = []
        self.max_body_bytes = max_body_bytes

    def capture(self, request_body: Any, response_body: Any, **kw: Any) -> bool:
        kept = {k: v for k, v in kw.items() if k.endswith("content_type")}
        self.captured.append(((request_body, response_body), kept))
        return True


def _messages(*messages: dict[str, Any]) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


def _append(out: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Any]:
    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    return send


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {server.stdout.read() if server.stdout else b''!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("uvicorn did not start listening")
