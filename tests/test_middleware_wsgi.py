"""WSGICaptureMiddleware against real parts: a real `captured serve` daemon (the `daemon`
fixture), a real `CaptureClient`, Flask apps driven by Flask's own test client (Werkzeug's for
plain WSGI callables), and at the end a real gunicorn with 4 pre-forked workers over HTTP.

Each test compares what the daemon delivered (its JSON Lines, read after it stopped) with what
was sent and returned, and checks the middleware's counters exactly.
"""

from __future__ import annotations

import base64
import collections
import http.client
import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request
from werkzeug.test import Client, EnvironBuilder
from werkzeug.wsgi import FileWrapper

from captured import CaptureClient
from captured.middleware import MiddlewareStats, WSGICaptureMiddleware
from captured.testing.daemon import DaemonProcess, wait_for

CSV = "text/csv"
JSON = "application/json"
SSE = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
ID_HEADER = "X-Amzn-SageMaker-Inference-Id"
ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"

Wrap = Callable[..., tuple[Flask, WSGICaptureMiddleware]]


class Boom(Exception):
    """What the model raises."""


def model_app(log: dict[str, list[Any]] | None = None) -> Flask:
    """A model server: SageMaker's routes and a few that read or answer in unusual ways.
    `log["produced"]` gets each streamed chunk as the generator yields it, `log["raised"]` each
    exception a route raised, `log["closed"]` an entry when a stream's generator was closed."""
    log = {} if log is None else log
    for key in ("produced", "raised", "closed"):
        log.setdefault(key, [])
    app = Flask("model")
    app.testing = True  # exceptions reach the test client

    @app.post("/invocations")
    def invocations() -> Any:
        data = request.get_json()
        return {"scores": [x * 2 for x in data["instances"]]}

    @app.post("/csv")
    def csv() -> Response:
        return Response(request.get_data() + b",0.5", content_type=CSV)

    @app.post("/stream")
    def stream() -> Response:
        request.get_data()

        def events() -> Iterator[bytes]:
            try:
                for chunk in SSE:
                    log["produced"].append(chunk)
                    yield chunk
            finally:
                log["closed"].append(True)

        return Response(events(), content_type="text/event-stream")

    @app.post("/stream-fails")
    def stream_fails() -> Response:
        def events() -> Iterator[bytes]:
            yield SSE[0]
            exc = Boom("the model failed mid-stream")
            log["raised"].append(exc)
            raise exc

        return Response(events(), content_type="text/event-stream")

    @app.post("/pieces")
    def pieces() -> Response:
        parts = []
        while part := request.stream.read(5):
            parts.append(part)
        return Response(b"|".join(parts), content_type=CSV)

    @app.post("/first5")
    def first5() -> Response:
        return Response(request.stream.read(5), content_type=CSV)

    @app.post("/ignore")
    def ignore() -> Response:
        return Response(b"0.5", content_type=CSV)

    @app.post("/big")
    def big() -> Response:
        return Response(b"9" * 101, content_type=CSV)

    @app.post("/boom")
    def boom() -> Response:
        exc = Boom("the model failed")
        log["raised"].append(exc)
        raise exc

    @app.post("/fail")
    def fail() -> tuple[bytes, int, dict[str, str]]:
        return b"model error", 500, {"Content-Type": CSV}

    @app.route("/ping", methods=["GET", "POST"])
    def ping() -> Response:
        return Response(b"", status=200)

    return app


# ---- helpers ----------------------------------------------------------------------------


@pytest.fixture
def wrap(daemon: DaemonProcess) -> Iterator[Wrap]:
    """`wrap(app=None, **options)`: the app (default `model_app()`) with its `wsgi_app` wrapped
    in a middleware on the test's daemon; every middleware made is closed at the end."""
    made: list[WSGICaptureMiddleware] = []

    def make(app: Flask | None = None, **options: Any) -> tuple[Flask, WSGICaptureMiddleware]:
        app = model_app() if app is None else app
        if "client" not in options:
            options["socket_path"] = daemon.socket_path
        mw = WSGICaptureMiddleware(app.wsgi_app, **options)
        app.wsgi_app = mw  # type: ignore[method-assign]
        made.append(mw)
        return app, mw

    yield make
    for mw in made:
        mw.close()


def delivered(daemon: DaemonProcess, *middlewares: WSGICaptureMiddleware) -> list[dict[str, Any]]:
    """Flush and close the middlewares' clients, stop the daemon (it seals and delivers) and
    return every line it delivered."""
    for mw in middlewares:
        mw.close()
    assert daemon.stop() == 0, daemon.log()
    return daemon.delivered_lines()


def side(mode: str, content_type: str | None, body: bytes) -> dict[str, Any]:
    """One side of `captureData` as the daemon writes it for the test config (CSV: text/csv;
    JSON: application/json(lines); anything else BASE64)."""
    media = None if content_type is None else content_type.partition(";")[0].strip().lower()
    encoding = "CSV" if media == CSV else "JSON" if media in (JSON, "application/jsonlines") else "BASE64"
    data = base64.b64encode(body).decode() if encoding == "BASE64" else body.decode()
    return {"observedContentType": content_type, "mode": mode, "data": data, "encoding": encoding}


def capture_data(
    request_type: str | None, request_body: bytes, response_type: str | None, response_body: bytes
) -> dict[str, Any]:
    return {
        "endpointInput": side("INPUT", request_type, request_body),
        "endpointOutput": side("OUTPUT", response_type, response_body),
    }


def metadata(line: dict[str, Any]) -> tuple[str | None, str | None]:
    """(inferenceId, customAttributes) of a delivered line; None where absent."""
    meta = line["eventMetadata"]
    return meta.get("inferenceId"), meta.get("customAttributes")


def check_stats(
    mw: WSGICaptureMiddleware,
    *,
    seen: int,
    captured: int,
    skipped: dict[str, int] | None = None,
    invalid: dict[str, int] | None = None,
    in_flight: int = 0,
) -> None:
    st = mw.stats()
    assert st.seen == st.captured + sum(st.skipped.values()) + st.in_flight
    assert st == MiddlewareStats(
        seen=seen,
        captured=captured,
        skipped=skipped or {},
        invalid_headers=invalid or {},
        in_flight=in_flight,
    )


def call(mw: WSGICaptureMiddleware, environ: dict[str, Any]) -> tuple[list[Any], Any, Iterable[bytes]]:
    """Call the middleware as a server would, by hand: (the arguments of each call of the
    server's start_response, that start_response, the iterable the server got)."""
    calls: list[Any] = []

    def start_response(*args: Any) -> Callable[[bytes], None]:
        calls.append(args)
        return lambda data: None

    return calls, start_response, mw(environ, start_response)


# ---- bodies -----------------------------------------------------------------------------


def test_json_and_csv_bodies_are_captured_exactly(daemon: DaemonProcess, wrap: Wrap) -> None:
    app, mw = wrap(endpoint_name="test-endpoint", variant_name="Blue")
    client = app.test_client()
    r1 = client.post(
        "/invocations", json={"instances": [1, 2.5]}, headers={ID_HEADER: "req-1"}, buffered=True
    )
    assert (r1.status_code, r1.content_type, r1.get_json()) == (200, JSON, {"scores": [2, 5.0]})
    r2 = client.post("/csv", data=b"1,2,3\n4,5,6", content_type=CSV, buffered=True)
    assert r2.data == b"1,2,3\n4,5,6,0.5"
    check_stats(mw, seen=2, captured=2)

    lines = delivered(daemon, mw)
    assert [line["captureData"] for line in lines] == [
        capture_data(JSON, b'{"instances": [1, 2.5]}', JSON, r1.data),
        capture_data(CSV, b"1,2,3\n4,5,6", CSV, b"1,2,3\n4,5,6,0.5"),
    ]
    assert [metadata(line) for line in lines] == [("req-1", None), (None, None)]


def test_a_streamed_response_goes_through_chunk_by_chunk_and_is_captured_whole(
    daemon: DaemonProcess, wrap: Wrap
) -> None:
    log: dict[str, list[Any]] = {}
    app, mw = wrap(model_app(log))
    with app.test_client().post("/stream", data=b'{"prompt": "hi"}', content_type=JSON) as r:
        chunks = iter(r.response)
        for i, expected in enumerate(SSE):
            assert next(chunks) == expected  # the chunk itself, unchanged
            assert log["produced"] == SSE[: i + 1]  # and nothing read ahead: no buffering
        assert next(chunks, None) is None
        check_stats(mw, seen=1, captured=0, in_flight=1)  # the server has not closed it yet
    check_stats(mw, seen=1, captured=1)
    assert log["closed"] == [True]

    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(JSON, b'{"prompt": "hi"}', "text/event-stream", b"".join(SSE))


def test_an_early_closed_stream_is_not_captured(daemon: DaemonProcess, wrap: Wrap) -> None:
    """The server stops iterating (its client went away) and closes: the app's close() runs once,
    nothing is captured, `disconnected`."""
    log: dict[str, list[Any]] = {}
    app, mw = wrap(model_app(log))
    with app.test_client().post("/stream", data=b"{}", content_type=JSON) as r:
        assert next(iter(r.response)) == SSE[0]
    assert log["closed"] == [True]
    assert log["produced"] == SSE[:1]
    check_stats(mw, seen=1, captured=0, skipped={"disconnected": 1})
    assert delivered(daemon, mw) == []


@pytest.mark.parametrize("route", ["/pieces", "/first5", "/ignore"])
def test_the_whole_request_is_captured_however_much_the_app_read(
    daemon: DaemonProcess, wrap: Wrap, route: str
) -> None:
    """In 5-byte pieces, only the first 5 bytes, or not at all: the app sees the body as
    without the middleware; the capture holds all of it."""
    body = b"1,2,3,4,5,6,7,8,9,10,11,12"
    plain = model_app().test_client().post(route, data=body, content_type=CSV, buffered=True)
    app, mw = wrap()
    r = app.test_client().post(route, data=body, content_type=CSV, buffered=True)
    assert (r.status, r.data) == (plain.status, plain.data)
    assert (
        r.data
        == {"/pieces": b"1,2,3|,4,5,|6,7,8|,9,10|,11,1|2", "/first5": b"1,2,3", "/ignore": b"0.5"}[route]
    )
    check_stats(mw, seen=1, captured=1)

    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, body, CSV, r.data)


def read_input(style: str, inp: Any) -> bytes:
    """Read `wsgi.input` the way `style` says; what the app got."""
    if style == "read":
        data: bytes = inp.read()
        return data
    if style == "read(3)":
        return b"".join(iter(lambda: inp.read(3), b""))
    if style == "readline":
        return b"".join(iter(inp.readline, b""))
    if style == "readline(4)":
        return b"".join(iter(lambda: inp.readline(4), b""))
    if style == "readlines":
        return b"".join(inp.readlines())
    if style == "readlines(5)+read":
        first = b"".join(inp.readlines(5))  # whole lines, up to about 5 bytes
        rest: bytes = inp.read()
        return first + rest
    if style == "iterate":
        return b"".join(inp)
    if style == "readinto":
        buf = bytearray(7)
        got = b""
        while n := inp.readinto(buf):
            got += bytes(buf[:n])
        return got
    assert style == "read(7) only"
    data = inp.read(7)
    return data


@pytest.mark.parametrize(
    "style",
    [
        "read",
        "read(3)",
        "readline",
        "readline(4)",
        "readlines",
        "readlines(5)+read",
        "iterate",
        "readinto",
        "read(7) only",
    ],
)
def test_every_way_of_reading_wsgi_input_passes_through(daemon: DaemonProcess, style: str) -> None:
    """A plain WSGI app reading `wsgi.input` itself, each PEP 3333 way (and `readinto`)."""
    body = b"1,2\n3,4\n5,6,7,8\n9\n"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got = read_input(style, environ["wsgi.input"])
        start_response("200 OK", [("Content-Type", CSV)])
        return [got]

    plain = Client(app).post("/", data=body, content_type=CSV, buffered=True)
    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    r = Client(mw).post("/", data=body, content_type=CSV, buffered=True)
    assert r.data == plain.data == (body[:7] if style == "read(7) only" else body)
    check_stats(mw, seen=1, captured=1)

    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, body, CSV, r.data)


def test_a_client_that_went_away_before_its_body_arrived_is_not_captured(
    daemon: DaemonProcess, wrap: Wrap
) -> None:
    """Content-Length 100, 10 bytes came, the app read none: the rest cannot be read after the
    response, so the capture would not be the request: `disconnected`."""
    app, mw = wrap()
    client = app.test_client()
    overrides = {"CONTENT_LENGTH": "100"}
    r = client.post("/ignore", data=b"x" * 10, content_type=CSV, environ_overrides=overrides, buffered=True)
    assert (r.status_code, r.data) == (200, b"0.5")
    check_stats(mw, seen=1, captured=0, skipped={"disconnected": 1})
    assert delivered(daemon, mw) == []


def test_a_chunked_request_is_captured_as_far_as_the_app_read_it(daemon: DaemonProcess) -> None:
    """No CONTENT_LENGTH (chunked, `wsgi.input_terminated`): nothing says how much is left, so
    nothing is read after the response; the capture holds what the app read."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        first = environ["wsgi.input"].read(4)
        start_response("200 OK", [("Content-Type", CSV)])
        return [first]

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    environ = EnvironBuilder(path="/", method="POST", data=b"1,2,3,4", content_type=CSV).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    _, _, out = call(mw, environ)
    assert list(out) == [b"1,2,"]
    out.close()  # type: ignore[attr-defined]
    assert environ["wsgi.input"].read() == b"3,4"  # the rest was left where it was
    check_stats(mw, seen=1, captured=1)
    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, b"1,2,", CSV, b"1,2,")


def test_an_app_reading_past_the_tee_is_answered_but_not_captured(daemon: DaemonProcess) -> None:
    """`read1` is not a PEP 3333 method: it reaches the server's stream unchanged, and the copy
    could miss what it read: that exchange is `capture_failed` (logged), the response is fine."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        first = environ["wsgi.input"].read1(3)
        start_response("200 OK", [("Content-Type", CSV)])
        return [first + environ["wsgi.input"].read()]

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    assert Client(mw).post("/", data=b"1,2,3", content_type=CSV, buffered=True).data == b"1,2,3"
    check_stats(mw, seen=1, captured=0, skipped={"capture_failed": 1})
    assert delivered(daemon, mw) == []


def test_the_legacy_write_callable_is_captured_too(daemon: DaemonProcess) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["wsgi.input"].read()
        write = start_response("200 OK", [("Content-Type", CSV)])
        write(b"1,")
        write(b"2,")
        return iter([b"3"])

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    with Client(mw).post("/", data=b"q", content_type=CSV) as r:  # (buffered=True drops write()s)
        assert r.data == b"1,2,3"
    check_stats(mw, seen=1, captured=1)
    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, b"q", CSV, b"1,2,3")


def test_a_file_wrapper_response_is_iterated_closed_and_captured(daemon: DaemonProcess) -> None:
    """`wsgi.file_wrapper` is wrapped like any iterable (no sendfile on captured routes)."""
    data = b"0.1,0.2,0.3,0.4,0.5"
    files: list[io.BytesIO] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", CSV), ("Content-Length", str(len(data)))])
        files.append(io.BytesIO(data))
        return environ["wsgi.file_wrapper"](files[0], 4)

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    overrides = {"wsgi.file_wrapper": FileWrapper}
    r = Client(mw).post("/", data=b"x", content_type=CSV, environ_overrides=overrides, buffered=True)
    assert (r.data, r.headers["Content-Length"]) == (data, str(len(data)))
    assert files[0].closed
    check_stats(mw, seen=1, captured=1)
    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, b"x", CSV, data)


def test_skipped_requests_pass_with_nothing_wrapped_and_captured_ones_keep_their_shape(
    daemon: DaemonProcess,
) -> None:
    """Not captured: the app gets the server's environ, wsgi.input and start_response, the server
    gets the app's iterable. Captured: a list stays sized (servers derive Content-Length from
    len()); start_response gets exc_info only when the app gave it, the very same tuple."""
    result = [b"ok"]
    got: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.update(environ=environ, input=environ["wsgi.input"], start_response=start_response)
        start_response("200 OK", [("Content-Type", CSV)])
        try:
            raise Boom("handled")
        except Boom:
            got["exc_info"] = sys.exc_info()
            start_response("500 Internal Server Error", [("Content-Type", CSV)], got["exc_info"])
        return result

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path, capture_errors=True)
    environ = EnvironBuilder(path="/ping", method="POST", data=b"1").get_environ()
    server_input = environ["wsgi.input"]
    calls, server_start_response, out = call(mw, environ)
    assert out is result
    assert got["environ"] is environ and got["input"] is server_input
    assert got["start_response"] is server_start_response
    check_stats(mw, seen=1, captured=0, skipped={"excluded": 1})

    calls, _, out = call(mw, EnvironBuilder(path="/invocations", method="POST", data=b"1").get_environ())
    assert out is not result and len(out) == 1  # type: ignore[arg-type]
    assert list(out) == result
    assert [len(args) for args in calls] == [2, 3] and calls[1][2] is got["exc_info"]
    out.close()  # type: ignore[attr-defined]
    check_stats(mw, seen=2, captured=1, skipped={"excluded": 1})
    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(None, b"1", CSV, b"ok")


# ---- errors -----------------------------------------------------------------------------


def test_an_app_that_raises_raises_the_same_with_the_middleware(daemon: DaemonProcess, wrap: Wrap) -> None:
    """Flask with `testing`: the route's exception reaches the test client; with the middleware
    it is the very exception object, its traceback ending in the route, as without it."""
    plain_log: dict[str, list[Any]] = {}
    with pytest.raises(Boom) as plain:
        model_app(plain_log).test_client().post("/boom", data=b"1", content_type=CSV)
    log: dict[str, list[Any]] = {}
    app, mw = wrap(model_app(log))
    with pytest.raises(Boom) as wrapped:
        app.test_client().post("/boom", data=b"1", content_type=CSV)
    assert wrapped.value is log["raised"][0]
    assert str(wrapped.value) == str(plain.value)
    innermost = traceback.extract_tb(wrapped.value.__traceback__)[-1]
    assert innermost.name == traceback.extract_tb(plain.value.__traceback__)[-1].name == "boom"
    check_stats(mw, seen=1, captured=0, skipped={"app_error": 1})

    # Raised from the iterable, after the first chunk went out: the same, and no capture.
    with app.test_client().post("/stream-fails", data=b"1", content_type=CSV) as r:
        chunks = iter(r.response)
        assert next(chunks) == SSE[0]
        with pytest.raises(Boom) as mid_stream:
            next(chunks)
        assert mid_stream.value is log["raised"][1]
    check_stats(mw, seen=2, captured=0, skipped={"app_error": 2})

    # Without `testing` Flask answers 500 itself: an error status, not an app error.
    app.testing = False
    r = app.test_client().post("/boom", data=b"1", content_type=CSV, buffered=True)
    assert r.status_code == 500
    check_stats(mw, seen=3, captured=0, skipped={"app_error": 2, "error_status": 1})
    assert delivered(daemon, mw) == []


def test_the_apps_close_runs_exactly_once_and_its_exception_propagates(daemon: DaemonProcess) -> None:
    class Result:
        def __init__(self) -> None:
            self.closed = 0
            self.error = Boom("close failed")

        def __iter__(self) -> Iterator[bytes]:
            yield b"0.5"

        def close(self) -> None:
            self.closed += 1
            raise self.error

    result = Result()

    def app(environ: dict[str, Any], start_response: Any) -> Result:
        start_response("200 OK", [("Content-Type", CSV)])
        return result

    mw = WSGICaptureMiddleware(app, socket_path=daemon.socket_path)
    _, _, out = call(mw, EnvironBuilder(path="/", method="POST", data=b"1").get_environ())
    assert list(out) == [b"0.5"]
    with pytest.raises(Boom) as raised:
        out.close()  # type: ignore[attr-defined]
    assert raised.value is result.error
    out.close()  # type: ignore[attr-defined]  # a server closing twice: the app's close() ran once
    assert result.closed == 1
    check_stats(mw, seen=1, captured=0, skipped={"app_error": 1})
    assert delivered(daemon, mw) == []


@pytest.mark.parametrize("capture_errors", [False, True])
def test_error_responses_are_captured_only_with_capture_errors(
    daemon: DaemonProcess, wrap: Wrap, capture_errors: bool
) -> None:
    app, mw = wrap(capture_errors=capture_errors)
    client = app.test_client()
    r500 = client.post("/fail", data=b"1,2", content_type=CSV, buffered=True)
    r404 = client.post("/no-such-route", data=b"3,4", content_type=CSV, buffered=True)
    assert (r500.status_code, r500.data, r404.status_code) == (500, b"model error", 404)
    if capture_errors:
        check_stats(mw, seen=2, captured=2)
    else:
        check_stats(mw, seen=2, captured=0, skipped={"error_status": 2})

    lines = delivered(daemon, mw)
    expected = [
        capture_data(CSV, b"1,2", CSV, b"model error"),
        capture_data(CSV, b"3,4", r404.content_type, r404.data),
    ]
    assert [line["captureData"] for line in lines] == (expected if capture_errors else [])


# ---- which requests ---------------------------------------------------------------------


def any_route_app() -> Flask:
    app = Flask("any")

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT"])
    def echo(path: str) -> Response:
        return Response(f"{request.method} /{path} {request.get_data().decode()}".encode(), content_type=CSV)

    return app


def test_methods_paths_and_excluded_paths(daemon: DaemonProcess, wrap: Wrap) -> None:
    """`SCRIPT_NAME + PATH_INFO` is the path matched: an app mounted under /mounted is matched
    with its prefix."""
    app, mw = wrap(any_route_app(), methods=("POST", "put"), paths=("/invocations", "/v1/", "/mounted/"))
    client = app.test_client()
    requests = [
        ("GET", "/ping", "", None),  # method (checked first)
        ("POST", "/ping", "", None),  # excluded
        ("POST", "/metrics", "", None),  # excluded
        ("GET", "/invocations", "", None),  # method
        ("PUT", "/invocations", "", "PUT /invocations a"),
        ("POST", "/v1/models/m", "", "POST /v1/models/m a"),
        ("POST", "/v1", "", "POST /v1 a"),  # `/v1/` also matches `/v1` itself
        ("POST", "/v2/models/m", "", None),  # path
        ("POST", "/invocations", "/mounted", "POST /invocations a"),  # /mounted/invocations
        ("POST", "/invocations", "/elsewhere", None),  # /elsewhere/invocations: path
    ]
    for method, path, script_name, _ in requests:
        r = client.open(
            path, method=method, data=b"a", base_url=f"http://localhost{script_name}", buffered=True
        )
        assert r.status_code == 200
    check_stats(mw, seen=10, captured=4, skipped={"method": 2, "excluded": 2, "path": 2})

    lines = delivered(daemon, mw)
    answers = [answer for *_, answer in requests if answer is not None]
    assert [line["captureData"]["endpointOutput"]["data"] for line in lines] == answers
    assert [line["captureData"]["endpointInput"]["data"] for line in lines] == ["YQ=="] * 4  # b"a", no type


# ---- SageMaker's headers ----------------------------------------------------------------


def test_sagemaker_headers_valid_ones_captured_invalid_ones_left_out_and_counted(
    daemon: DaemonProcess, wrap: Wrap
) -> None:
    app, mw = wrap()
    client = app.test_client()
    cases = [
        ({ID_HEADER: "id-1", ATTRIBUTES_HEADER: "trace=1,model=v2"}, ("id-1", "trace=1,model=v2")),
        ({ID_HEADER: "x" * 64}, ("x" * 64, None)),  # the longest valid
        ({ID_HEADER: "x" * 65}, (None, None)),  # too long
        ({ID_HEADER: " starts-with-a-space", ATTRIBUTES_HEADER: "ok"}, (None, "ok")),
        ({ID_HEADER: "id-5", ATTRIBUTES_HEADER: "caf\u00e9"}, ("id-5", None)),  # not ASCII
        ({ATTRIBUTES_HEADER: "a" * 1025}, (None, None)),  # too long
    ]
    for i, (headers, _) in enumerate(cases):
        r = client.post("/csv", data=f"{i}".encode(), content_type=CSV, headers=headers, buffered=True)
        assert (r.status_code, r.data) == (200, f"{i},0.5".encode())
    check_stats(mw, seen=6, captured=6, invalid={"inference_id": 2, "custom_attributes": 2})

    lines = delivered(daemon, mw)
    assert [metadata(line) for line in lines] == [expected for _, expected in cases]
    assert [line["captureData"]["endpointInput"]["data"] for line in lines] == [f"{i}" for i in range(6)]


# ---- size -------------------------------------------------------------------------------


def test_bodies_over_max_body_bytes_are_answered_but_not_captured(daemon: DaemonProcess, wrap: Wrap) -> None:
    app, mw = wrap(max_body_bytes=100)
    client = app.test_client()
    over, at_limit = b"7" * 101, b"7" * 100
    r = client.post("/csv", data=over, content_type=CSV, buffered=True)  # read by the app
    assert r.data == over + b",0.5"
    r = client.post("/ignore", data=over, content_type=CSV, buffered=True)  # unread: not read after
    assert r.data == b"0.5"
    r = client.post("/big", data=b"1", content_type=CSV, buffered=True)  # the response
    assert r.data == b"9" * 101
    r = client.post("/ignore", data=at_limit, content_type=CSV, buffered=True)
    assert r.data == b"0.5"
    check_stats(mw, seen=4, captured=1, skipped={"too_large": 3})

    [line] = delivered(daemon, mw)
    assert line["captureData"] == capture_data(CSV, at_limit, CSV, b"0.5")


# ---- the client, threads ----------------------------------------------------------------


def test_a_given_client_is_used_and_left_open(daemon: DaemonProcess, wrap: Wrap) -> None:
    own = CaptureClient(daemon.socket_path)
    try:
        with pytest.raises(ValueError, match="not both"):
            WSGICaptureMiddleware(model_app().wsgi_app, socket_path=daemon.socket_path, client=own)
        app, mw = wrap(client=own)
        assert mw.owned is None and mw.client is own
        app.test_client().post("/csv", data=b"1", content_type=CSV, buffered=True)
        mw.close()
        assert own.capture(b"2", b"3", request_content_type=CSV, response_content_type=CSV)  # still open
        assert own.flush(10)
        assert own.stats()["acknowledged"] == 2
        check_stats(mw, seen=1, captured=1)
    finally:
        own.close()
    lines = delivered(daemon)
    assert [line["captureData"]["endpointOutput"]["data"] for line in lines] == ["1,0.5", "3"]


def test_requests_on_many_threads_are_captured_each_with_its_own_bodies(
    daemon: DaemonProcess, wrap: Wrap
) -> None:
    app, mw = wrap()
    threads, per_thread = 8, 25

    def run(t: int) -> None:
        client = app.test_client()
        for i in range(per_thread):
            body = f"{t},{i}".encode()
            r = client.post(
                "/csv", data=body, content_type=CSV, headers={ID_HEADER: f"{t}-{i}"}, buffered=True
            )
            assert r.data == body + b",0.5"

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    check_stats(mw, seen=threads * per_thread, captured=threads * per_thread)

    lines = delivered(daemon, mw)
    got = {line["eventMetadata"]["inferenceId"]: line["captureData"] for line in lines}
    assert len(lines) == len(got) == threads * per_thread
    for t in range(threads):
        for i in range(per_thread):
            body = f"{t},{i}".encode()
            assert got[f"{t}-{i}"] == capture_data(CSV, body, CSV, body + b",0.5")


# ---- gunicorn ---------------------------------------------------------------------------

GUNICORN_APP = '''
"""Served by gunicorn in test_middleware_wsgi.py: two middlewares, both made before the fork."""

import os

from flask import Flask, Response, request

from captured import CaptureClient
from captured.middleware import WSGICaptureMiddleware

app = Flask("gunicorn_app")


@app.post("/invocations")
@app.post("/held")
def invocations() -> Response:
    body = request.get_data()
    return Response(body + b",0.5", content_type="text/csv", headers={"X-Worker": str(os.getpid())})


@app.get("/ping")
def ping() -> Response:
    return Response(b"", status=200)


socket_path = os.environ["WSGI_TEST_SOCKET"]
# /held: a client that sends only when a batch fills or it closes (10 s linger), so its records
# reach the daemon only if each worker's client is flushed when the worker exits.
held = CaptureClient(socket_path, linger_s=10.0)
inner = WSGICaptureMiddleware(app.wsgi_app, client=held, paths=["/held"])
# /invocations: the middleware's own client (the usual setup).
app.wsgi_app = WSGICaptureMiddleware(inner, socket_path=socket_path, paths=["/invocations"])
'''


def listening_port(gunicorn_log: str) -> int | None:
    found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", gunicorn_log)
    return int(found[1]) if found else None


def free_gunicorn(proc: subprocess.Popen[bytes]) -> None:
    """Stop the gunicorn this test started and all its workers (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_gunicorn_prefork_workers_capture_every_request_once_and_flush_at_exit(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    (tmp_path / "wsgi_gunicorn_app.py").write_text(textwrap.dedent(GUNICORN_APP))
    log_path = tmp_path / "gunicorn.log"
    cmd = [sys.executable, "-m", "gunicorn", "-w", "4", "--preload", "-b", "127.0.0.1:0",
           "--chdir", str(tmp_path), "--graceful-timeout", "10", "--log-level", "info",
           "wsgi_gunicorn_app:app"]  # fmt: skip
    env = dict(os.environ, WSGI_TEST_SOCKET=daemon.socket_path)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=log_file, start_new_session=True)
    try:
        port = wait_for(lambda: listening_port(log_path.read_text()), 30)
        wait_for(lambda: log_path.read_text().count("Booting worker") == 4, 30)

        def post(path: str, body: bytes, inference_id: str) -> tuple[int, bytes, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                headers = {"Content-Type": CSV, ID_HEADER: inference_id}
                conn.request("POST" if body else "GET", path, body=body or None, headers=headers)
                r = conn.getresponse()
                return r.status, r.read(), r.headers.get("X-Worker", "")
            finally:
                conn.close()

        assert post("/ping", b"", "probe")[:2] == (200, b"")  # excluded: never captured
        jobs = [
            (path, f"{i},{i * 2}".encode(), f"{path[1:]}-{i}")
            for i in range(100)
            for path in ("/invocations", "/held")
        ]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda job: post(*job), jobs))
        assert [(status, data) for status, data, _ in answers] == [
            (200, body + b",0.5") for _, body, _ in jobs
        ]
        workers = {pid for *_, pid in answers}
        assert len(workers) >= 2, workers  # the requests were served by several forked workers

        # /invocations arrives at once; /held only when the workers exit (unless 10 s passed).
        wait_for(lambda: daemon.status()["counters"]["received"] >= 100, 20)
        received_before_exit = daemon.status()["counters"]["received"]
        if time.monotonic() - started < 8:  # the held clients' linger cannot have run out
            assert received_before_exit == 100

        proc.send_signal(signal.SIGTERM)  # the master stops the workers; each flushes at exit
        assert proc.wait(30) == 0
    finally:
        free_gunicorn(proc)
    gunicorn_log = log_path.read_text()
    assert "Traceback" not in gunicorn_log, gunicorn_log
    assert gunicorn_log.count("Worker exiting") == 4, gunicorn_log

    assert daemon.status()["counters"]["received"] == 200
    lines = delivered(daemon)
    by_id = collections.Counter(line["eventMetadata"]["inferenceId"] for line in lines)
    assert by_id == collections.Counter(inference_id for *_, inference_id in jobs)  # each exactly once
    got = {line["eventMetadata"]["inferenceId"]: line["captureData"] for line in lines}
    for _, body, inference_id in jobs:
        assert got[inference_id] == capture_data(CSV, body, CSV, body + b",0.5")
