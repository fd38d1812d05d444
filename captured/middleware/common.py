"""What the ASGI and WSGI middlewares share: which requests are captured, SageMaker's headers,
the bounded copy of a body, handing a capture to the client, and the counters.

Nothing here does I/O; both middlewares call it per request. Every failure inside capture is
counted and swallowed: capture never breaks a response.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Protocol, TypedDict

import msgspec

from captured.wire.rules import MAX_BODY_BYTES, MAX_CUSTOM_ATTRIBUTES, MAX_INFERENCE_ID, valid_name

log = logging.getLogger("captured.middleware")

#: SageMaker's request headers (lower-case, as ASGI gives them).
INFERENCE_ID_HEADER = "x-amzn-sagemaker-inference-id"
CUSTOM_ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
#: Health and metrics probes: never captured unless `exclude_paths` says otherwise.
DEFAULT_EXCLUDE_PATHS = ("/ping", "/health", "/healthz", "/metrics")

# Why a request was not captured (`stats()["skipped"]`).
METHOD = "method"  # not one of `methods`
PATH = "path"  # not under `paths`
EXCLUDED = "excluded"  # under `exclude_paths`
ERROR_STATUS = "error_status"  # status >= 400 and `capture_errors` off
TOO_LARGE = "too_large"  # a body over `max_body_bytes`
DISCONNECTED = "disconnected"  # the client went away before the response ended
APP_ERROR = "app_error"  # the app raised (the exception propagates unchanged)
CAPTURE_FAILED = "capture_failed"  # capture itself failed (a bug, logged once): swallowed
CLIENT_DROPPED = "client_dropped"  # the capture client dropped it (its `stats()` says why)
SKIP_REASONS = (
    METHOD,
    PATH,
    EXCLUDED,
    ERROR_STATUS,
    TOO_LARGE,
    DISCONNECTED,
    APP_ERROR,
    CAPTURE_FAILED,
    CLIENT_DROPPED,
)


class Client(Protocol):
    """What the middlewares need of `CaptureClient` / `AsyncCaptureClient`."""

    @property
    def max_body_bytes(self) -> int: ...

    def capture(
        self,
        request_body: bytes | None,
        response_body: bytes | None,
        *,
        request_content_type: str | None = None,
        response_content_type: str | None = None,
        inference_id: str | None = None,
        custom_attributes: str | None = None,
        variant_name: str | None = None,
        endpoint_name: str | None = None,
    ) -> bool: ...


class Options(TypedDict, total=False):
    """The keyword options both middlewares take besides `socket_path` / `client` (`Policy`)."""

    endpoint_name: str | None
    variant_name: str | None
    methods: Iterable[str]
    paths: Iterable[str] | None
    exclude_paths: Iterable[str]
    capture_errors: bool
    max_body_bytes: int | None


class MiddlewareStats(msgspec.Struct, frozen=True):
    """seen = captured + sum(skipped) + in_flight."""

    #: Requests the middleware saw (every HTTP request, captured or not).
    seen: int
    captured: int
    #: By reason (`SKIP_REASONS`); a reason appears once it happened.
    skipped: dict[str, int]
    #: Captured without a SageMaker header that broke the client's rules, by header.
    invalid_headers: dict[str, int]
    #: Requests seen whose response has not ended yet.
    in_flight: int


class Counters:
    """Thread-safe (WSGI servers run requests on threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen = self.captured = 0
        self.skipped: dict[str, int] = {}
        self.invalid_headers: dict[str, int] = {}
        self._logged: set[str] = set()

    def saw(self) -> None:
        with self._lock:
            self.seen += 1

    def skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def took(self) -> None:
        with self._lock:
            self.captured += 1

    def invalid(self, header: str) -> None:
        with self._lock:
            self.invalid_headers[header] = self.invalid_headers.get(header, 0) + 1

    def failed(self, exc: BaseException) -> None:
        """Capture itself failed: counted, logged once per kind, never raised."""
        self.skip(CAPTURE_FAILED)
        kind = type(exc).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.error("capture failed (the response was not affected): %r", exc, exc_info=exc)

    def statistics(self) -> MiddlewareStats:
        with self._lock:
            done = self.captured + sum(self.skipped.values())
            return MiddlewareStats(
                seen=self.seen,
                captured=self.captured,
                skipped=dict(self.skipped),
                invalid_headers=dict(self.invalid_headers),
                in_flight=self.seen - done,
            )


def policy_for(client: Client | None, options: Options) -> Policy:
    """The `Policy` of a middleware's options; the body limit defaults to its client's."""
    if options.get("max_body_bytes") is None and client is not None:
        options = {**options, "max_body_bytes": client.max_body_bytes}
    return Policy(**options)


def _matcher(paths: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact paths, and prefixes: an entry ending in `/` or `*` matches every path it starts
    (`/v1/` matches `/v1/models/x`; `/v1*` also `/v1beta`)."""
    exact, prefixes = set(), []
    for p in paths:
        if p.endswith("*"):
            prefixes.append(p[:-1])
        elif p.endswith("/") and p != "/":
            prefixes.append(p)
            exact.add(p.rstrip("/"))
        else:
            exact.add(p)
    return frozenset(exact), tuple(prefixes)


class Policy:
    """Which requests are captured, and with what; the middlewares' keyword options."""

    def __init__(
        self,
        *,
        endpoint_name: str | None = None,
        variant_name: str | None = None,
        methods: Iterable[str] = ("POST",),
        paths: Iterable[str] | None = None,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        capture_errors: bool = False,
        max_body_bytes: int | None = None,
    ) -> None:
        """`max_body_bytes`: None means the client's limit (`MAX_BODY_BYTES` unless the client
        says less)."""
        if max_body_bytes is None:
            max_body_bytes = MAX_BODY_BYTES
        for name, value in (("endpoint_name", endpoint_name), ("variant_name", variant_name)):
            if value is not None and not valid_name(value):
                raise ValueError(f"{name} {value!r} does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}}")
        if not 0 < max_body_bytes <= MAX_BODY_BYTES:
            raise ValueError(f"max_body_bytes must be 1..{MAX_BODY_BYTES} (the client's limit)")
        self.endpoint_name = endpoint_name
        self.variant_name = variant_name
        self.methods = frozenset(m.upper() for m in methods)
        self.paths = None if paths is None else _matcher(paths)
        self.exclude = _matcher(exclude_paths)
        self.capture_errors = capture_errors
        self.max_body_bytes = max_body_bytes

    def skip_reason(self, method: str, path: str) -> str | None:
        """Why a request is not captured, before it runs; None: capture it."""
        if method.upper() not in self.methods:
            return METHOD
        if _matches(self.exclude, path):
            return EXCLUDED
        if self.paths is not None and not _matches(self.paths, path):
            return PATH
        return None


def _matches(matcher: tuple[frozenset[str], tuple[str, ...]], path: str) -> bool:
    exact, prefixes = matcher
    return path in exact or path.startswith(prefixes)


def inference_id(value: str | None, counters: Counters) -> str | None:
    """The `X-Amzn-SageMaker-Inference-Id` header as the client accepts it, or None (counted)."""
    if value is None:
        return None
    if 0 < len(value) <= MAX_INFERENCE_ID and value.isprintable() and value[0] != " ":
        return value
    counters.invalid("inference_id")
    return None


def custom_attributes(value: str | None, counters: Counters) -> str | None:
    """The `X-Amzn-SageMaker-Custom-Attributes` header as the client accepts it, or None (counted)."""
    if value is None:
        return None
    if len(value) <= MAX_CUSTOM_ATTRIBUTES and value.isascii():
        return value
    counters.invalid("custom_attributes")
    return None


class BodyCopy:
    """A copy of a body as it passes, up to `limit` bytes; past it, only the fact is kept."""

    __slots__ = ("chunks", "limit", "over", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.over = False

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.mark_over()
        elif not self.over:
            self.chunks.append(bytes(chunk))

    def mark_over(self) -> None:
        """The body is known to be over the limit (without reading it): keep nothing."""
        self.over = True
        self.chunks = []

    def value(self) -> bytes:
        return b"".join(self.chunks)


def submit(
    client: Client,
    policy: Policy,
    counters: Counters,
    *,
    status: int,
    request: BodyCopy,
    response: BodyCopy,
    request_content_type: str | None,
    response_content_type: str | None,
    inference_id_header: str | None,
    custom_attributes_header: str | None,
) -> None:
    """Hand one finished exchange to the client, or count why not. Never raises. The SageMaker
    headers are checked only for an exchange that is captured (`invalid_headers` counts the
    captures that went without one)."""
    try:
        if status >= 400 and not policy.capture_errors:
            counters.skip(ERROR_STATUS)
            return
        if request.over or response.over:
            counters.skip(TOO_LARGE)
            return
        kept = client.capture(
            request.value() or None,
            response.value() or None,
            request_content_type=request_content_type,
            response_content_type=response_content_type,
            inference_id=inference_id(inference_id_header, counters),
            custom_attributes=custom_attributes(custom_attributes_header, counters),
            variant_name=policy.variant_name,
            endpoint_name=policy.endpoint_name,
        )
        if kept:
            counters.took()
        else:
            counters.skip(CLIENT_DROPPED)
    except Exception as exc:  # capture must never break a response
        counters.failed(exc)


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes) among ASGI-style headers, as latin-1."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
