"""WSGI (PEP 3333) capture middleware: every model request captured, one line in the app.

    app.wsgi_app = WSGICaptureMiddleware(app.wsgi_app, socket_path="/run/captured/capture.sock")  # Flask
    application = WSGICaptureMiddleware(get_wsgi_application())                                  # Django

Which requests: `common.Policy.skip_reason(REQUEST_METHOD, SCRIPT_NAME + PATH_INFO)`, the whole
path the client asked for, in WSGI's form (PEP 3333's latin-1 "bytes as str"). An app at the
root (SageMaker's containers) is matched on `/invocations` and `/ping` as they are; one mounted
under a prefix (SCRIPT_NAME `/model`) on `/model/invocations`: `paths` and `exclude_paths` name
what clients ask for, wherever the app is mounted. Every request is counted; one that is not
captured is counted with its reason and passes with nothing wrapped: the app gets the server's
own environ and `start_response`, and the server gets the app's own iterable.

How one captured exchange is copied, all state per request (servers run requests on threads):

- `environ["wsgi.input"]` becomes a tee: `read`, `readline`, `readlines`, iteration (and
  `readinto`, which Werkzeug prefers) go to the server's stream with the caller's arguments and
  return what it returned, and the bytes that pass are copied (`common.BodyCopy`, up to
  `max_body_bytes`). Other attributes go to the server's stream unchanged; one that could read
  past the tee (`read1`, `seek`, `fileno`, ...) makes the copy untrustworthy: that exchange is
  not captured (`capture_failed`, logged once), the response is not affected.
- An app that leaves the body unread, or partly read: after the response ended, the rest is
  read from the server's stream (`CONTENT_LENGTH` says how much; the server would discard it),
  so the capture holds the whole request. A rest that would take the body over `max_body_bytes`
  is not read (`too_large`); a stream that ends early or fails means the client went away
  (`disconnected`). A chunked request without `CONTENT_LENGTH` is captured as far as the app
  read it.
- `start_response` is wrapped: the server's is called with the same arguments (`exc_info` only
  when given), then the status code and the `Content-Type` are noted; the legacy `write()` it
  returns is wrapped to copy what passes. Status and headers (Content-Length too) are the app's.
- The app's iterable is wrapped: each chunk goes to the server at once, unchanged (no buffering:
  server-sent events reach the client chunk by chunk), and is copied. A sized iterable (a list)
  stays sized (`len()`), so a server that derives Content-Length from it still does. An instance
  of `environ["wsgi.file_wrapper"]` is wrapped like any iterable: the server iterates it instead
  of using sendfile(2) (the capture needs the bytes; routes not captured keep sendfile).

When the exchange ends: PEP 3333 servers call the iterable's `close()` when they are done with
it, also after an error or a client that went away. The wrapper's `close()` calls the app's
`close()` (if it has one) exactly once, then: if the server iterated to the end, the capture
goes to the client (`common.submit`: bodies, content types, `X-Amzn-SageMaker-Inference-Id` and
`-Custom-Attributes`; a status >= 400 only with `capture_errors`, a body over the limit never);
if it stopped early, no capture (`disconnected`); if the iterable (or its `close()`) raised, no
capture (`app_error`) and the exception propagates unchanged, as does one raised by the app
call itself. A server that never calls `close()` breaks PEP 3333: its exchanges are never
captured and stay in `stats().in_flight`, which shows it (no `__del__` fallback: a finalizer may
run inside a lock of the same thread). Any failure of capture itself is counted and swallowed.

The client: `client=` (any `common.Client`, e.g. a `CaptureClient`; not closed here), or the
middleware's own `CaptureClient(socket_path)`, made at construction (None: the client finds the
socket, `captured.wire.rules.find_socket`). It survives fork(): under a pre-fork server
(`gunicorn --preload`) each worker gets a fresh buffer and I/O thread of its own, and flushes
at its exit (the client's `atexit` hook: gunicorn workers leave through `sys.exit`). `close()`
flushes and closes the middleware's own client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any, Final, Unpack, cast

from captured.client.sync import CaptureClient
from captured.middleware.common import (
    APP_ERROR,
    DISCONNECTED,
    BodyCopy,
    Client,
    Counters,
    MiddlewareStats,
    Options,
    policy_for,
    submit,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo, WriteableBuffer

#: How much of an unread request body is read per call after the response.
DRAIN_CHUNK = 64 * 1024

#: Attributes of `wsgi.input` the tee forwards without losing track of the body.
_PASSIVE_ATTRIBUTES: Final = frozenset(
    {"close", "closed", "readable", "writable", "seekable", "isatty", "name", "mode", "flush", "tell"}
)

# How the server's iteration of the response ended.
_RUNNING: Final = "running"  # not to the end (yet): at close(), the client went away
_ENDED: Final = "ended"  # StopIteration: the whole response went out
_RAISED: Final = "raised"  # the iterable (or its close()) raised


class WSGICaptureMiddleware:
    """Capture the request and response of every matching request of a WSGI app."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        socket_path: str | None = None,
        client: Client | None = None,
        **options: Unpack[Options],
    ) -> None:
        """`options`: `endpoint_name`, `variant_name`, `methods`, `paths`, `exclude_paths`,
        `capture_errors`, `max_body_bytes` (see `common.Policy` and the README)."""
        if client is not None and socket_path is not None:
            raise ValueError("give socket_path or client, not both")
        self.app = app
        self.policy = policy_for(client, options)
        self.counters = Counters()
        #: The middleware's own client (closed by `close()`), or None when `client=` was given.
        self.owned: CaptureClient | None = None
        if client is None:
            client = self.owned = CaptureClient(socket_path)
        self.client: Client = client

    def stats(self) -> MiddlewareStats:
        """What the middleware saw, captured and skipped, by reason."""
        return self.counters.statistics()

    def close(self) -> None:
        """Flush (up to the client's 5 s) and close the middleware's own client; a client given
        as `client=` is left open. Requests after this are counted `client_dropped`."""
        if self.owned is not None:
            self.owned.close()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        counters = self.counters
        counters.saw()
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        reason = self.policy.skip_reason(environ.get("REQUEST_METHOD", ""), path)
        if reason is not None:
            counters.skip(reason)
            return self.app(environ, start_response)
        try:
            exchange = _Exchange(self, environ, start_response)
        except Exception as exc:  # a bug of capture: this request passes uncaptured
            counters.failed(exc)
            return self.app(environ, start_response)
        try:
            result = self.app(environ, exchange.start_response)
        except BaseException:
            counters.skip(APP_ERROR)
            raise
        if hasattr(type(result), "__len__"):
            return _SizedResponse(result, exchange)
        return _Response(result, exchange)


class _CopyUntrusted(Exception):
    """The copy of a body may not be what passed (an attribute of `wsgi.input` that reads past
    the tee, a chunk that is not bytes): that exchange is not captured."""


class _TeeInput:
    """`wsgi.input` as the app sees it: the server's stream, copying what passes."""

    __slots__ = ("_lines", "_raw", "copy", "untrusted")

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self._lines: Iterator[bytes] | None = None
        self.copy = BodyCopy(limit)
        #: Why the copy may not be what the app read, once something made it so.
        self.untrusted: str | None = None

    def _add(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.copy.add(data)
        except Exception:  # not bytes: the app's problem, not the capture's
            self.untrusted = self.untrusted or f"wsgi.input gave a {type(data).__name__}"

    def read(self, size: int | None = None, /) -> bytes:
        data: bytes = self._raw.read() if size is None else self._raw.read(size)
        self._add(data)
        return data

    def readline(self, size: int | None = None, /) -> bytes:
        line: bytes = self._raw.readline() if size is None else self._raw.readline(size)
        self._add(line)
        return line

    def readlines(self, hint: int | None = None, /) -> list[bytes]:
        lines: list[bytes] = self._raw.readlines() if hint is None else self._raw.readlines(hint)
        for line in lines:
            self._add(line)
        return lines

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:
        """Werkzeug reads this way when the stream can (PEP 3333 promises only `read`)."""
        raw_readinto = getattr(self._raw, "readinto", None)
        if raw_readinto is not None:
            n: int | None = raw_readinto(buffer)
            if n:
                try:
                    self._add(memoryview(buffer).cast("B")[:n])
                except Exception:  # a buffer memoryview cannot flatten
                    self.untrusted = self.untrusted or "wsgi.input.readinto into an odd buffer"
            return n
        view = memoryview(buffer).cast("B")
        data: bytes = self._raw.read(len(view))
        view[: len(data)] = data
        self._add(data)
        return len(data)

    def __iter__(self) -> _TeeInput:
        return self

    def __next__(self) -> bytes:
        if self._lines is None:
            self._lines = iter(self._raw)
        line: bytes = next(self._lines)
        self._add(line)
        return line

    def __getattr__(self, name: str) -> Any:
        """Anything else of the server's stream, unchanged; one that may read past the tee
        (`read1`, `seek`, `fileno`, ...) makes the copy untrusted."""
        if name in _TeeInput.__slots__:  # not set yet: no recursion through self._raw
            raise AttributeError(name)
        if name not in _PASSIVE_ATTRIBUTES and self.untrusted is None:
            self.untrusted = f"the app used wsgi.input.{name}"
        return getattr(self._raw, name)

    def read_rest(self, content_length: int | None) -> bool:
        """After the response: read what the app left of a body of `content_length` bytes (a
        rest that takes it over the limit is not read: the copy is only marked `over`). False:
        the stream ended or failed before it did (the client went away)."""
        copy = self.copy
        if content_length is None or copy.over or copy.size >= content_length:
            return True
        if content_length > copy.limit:
            copy.mark_over()
            return True
        while copy.size < content_length:
            try:
                data = self.read(min(DRAIN_CHUNK, content_length - copy.size))
            except OSError:  # gunicorn's NoMoreData, a reset connection
                return False
            if not data:
                return False
        return True


class _Exchange:
    """One captured request/response as it passes: the copies, the status, the headers."""

    __slots__ = (
        "_start_response",
        "_write",
        "content_length",
        "content_type",
        "mw",
        "raw_custom_attributes",
        "raw_inference_id",
        "request",
        "request_content_type",
        "response",
        "status",
        "untrusted",
    )

    def __init__(self, mw: WSGICaptureMiddleware, environ: WSGIEnvironment, start: StartResponse) -> None:
        self.mw = mw
        self._start_response = start
        self._write: Callable[[bytes], object] | None = None
        limit = mw.policy.max_body_bytes
        # The few environ values the capture needs (not the environ: it may hold much).
        self.request_content_type: str | None = environ.get("CONTENT_TYPE") or None
        self.content_length = _content_length(environ.get("CONTENT_LENGTH"))
        self.raw_inference_id: str | None = environ.get("HTTP_X_AMZN_SAGEMAKER_INFERENCE_ID")
        self.raw_custom_attributes: str | None = environ.get("HTTP_X_AMZN_SAGEMAKER_CUSTOM_ATTRIBUTES")
        self.response = BodyCopy(limit)
        self.status: int | None = None
        self.content_type: str | None = None
        #: Why the response's copy may not be what went out, once something made it so.
        self.untrusted: str | None = None
        raw = environ.get("wsgi.input")
        self.request = None if raw is None else _TeeInput(raw, limit)
        if self.request is not None:  # last: nothing after it can fail
            environ["wsgi.input"] = self.request

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        if exc_info is None:
            write = self._start_response(status, headers)
        else:
            write = self._start_response(status, headers, exc_info)
        self._write = write
        try:
            self.status = _status_code(status)
            self.content_type = _header(headers, "content-type")
        except Exception:  # not str, yet the server took them: no capture, the response goes on
            self.untrusted = self.untrusted or "start_response got an unusual status or headers"
        return self.write

    def write(self, data: bytes) -> object:
        """The legacy `write()` callable: the server's, copying what passes."""
        assert self._write is not None  # handed out by start_response only
        result = self._write(data)
        self.copy_response(data)
        return result

    def copy_response(self, chunk: bytes) -> None:
        try:
            self.response.add(chunk)
        except Exception:  # not bytes: the server rejects it; the capture only notes it
            self.untrusted = self.untrusted or f"the response had a {type(chunk).__name__} chunk"

    def end(self, how: str) -> None:
        """The server is done with the response (it called close()): capture, or count why not."""
        counters = self.mw.counters
        try:
            untrusted = self.untrusted or (self.request.untrusted if self.request is not None else None)
            if how == _RAISED:
                counters.skip(APP_ERROR)
            elif how != _ENDED:
                counters.skip(DISCONNECTED)
            elif untrusted is not None:
                counters.failed(_CopyUntrusted(f"not captured: {untrusted}"))
            elif self.status is None:  # iterated to the end without start_response(): broken app
                counters.skip(APP_ERROR)
            elif not self._read_rest(self.status):
                counters.skip(DISCONNECTED)
            else:
                self._submit(self.status)
        except Exception as exc:  # capture must never break a response
            counters.failed(exc)

    def _read_rest(self, status: int) -> bool:
        """The rest of a body the app did not read, if the exchange can be captured at all."""
        if self.request is None or self.response.over:
            return True
        if status >= 400 and not self.mw.policy.capture_errors:
            return True  # not captured: nothing to read it for
        return self.request.read_rest(self.content_length)

    def _submit(self, status: int) -> None:
        mw, counters = self.mw, self.mw.counters
        submit(
            mw.client,
            mw.policy,
            counters,
            status=status,
            request=self.request.copy if self.request is not None else BodyCopy(1),
            response=self.response,
            request_content_type=self.request_content_type,
            response_content_type=self.content_type,
            inference_id_header=self.raw_inference_id,
            custom_attributes_header=self.raw_custom_attributes,
        )


class _Response:
    """The app's iterable as the server sees it: each chunk at once, unchanged, copied."""

    __slots__ = ("_closed", "_exchange", "_how", "_iterator", "_result")

    def __init__(self, result: Iterable[bytes], exchange: _Exchange) -> None:
        self._result = result
        self._exchange = exchange
        self._iterator: Iterator[bytes] | None = None
        self._how = _RUNNING
        self._closed = False

    def __iter__(self) -> _Response:
        return self

    def __next__(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            chunk = next(self._iterator)
        except StopIteration:
            self._how = _ENDED
            raise
        except BaseException:
            self._how = _RAISED
            raise
        self._exchange.copy_response(chunk)
        return chunk

    def close(self) -> None:
        """The app's close() once, then the capture (or why not)."""
        if self._closed:
            return
        self._closed = True
        app_close = getattr(self._result, "close", None)
        try:
            if app_close is not None:
                app_close()
        except BaseException:
            self._exchange.end(_RAISED)
            raise
        self._exchange.end(self._how)


class _SizedResponse(_Response):
    """A sized app iterable (a list) stays sized: servers may set Content-Length from len()."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(cast(Sized, self._result))


def _status_code(status: str) -> int | None:
    """200 of "200 OK"; None for a status line no server would send."""
    code = status[:3]
    return int(code) if len(code) == 3 and code.isdigit() else None


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header `name` (lower-case), WSGI style (str pairs)."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None
