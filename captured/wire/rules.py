"""The limits and name rules both sides of the socket apply, from SageMaker's contract.

The client checks a capture against them before it buffers it (a programming error raises at
the call), and the daemon checks every record again as it decodes it (a client is not trusted).
"""

from __future__ import annotations

import os
import re

#: SageMaker's largest request and response payload: the default maximum of each body.
MAX_BODY_BYTES = 6 * 1024 * 1024
#: Endpoint and variant names: SageMaker's EndpointName / VariantName pattern.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
#: Upper bound (exclusive) on epoch seconds: year 10000, where ISO-8601 ends.
MAX_EPOCH_S = 253402300800.0
#: inferenceId: 1..64 printable characters (SageMaker's InferenceId).
MAX_INFERENCE_ID = 64
#: customAttributes: at most 1024 ASCII characters (X-Amzn-SageMaker-Custom-Attributes).
MAX_CUSTOM_ATTRIBUTES = 1024
#: A content type, and an eventId the caller chooses, are at most this long.
MAX_CONTENT_TYPE = 1024
MAX_EVENT_ID = 128

#: AF_UNIX `sun_path` is 108 bytes including the terminating NUL: the longest socket path.
MAX_SOCKET_PATH = 107

#: The environment variable a client and `captured serve` both read: the capture socket's path.
SOCKET_ENV = "CAPTURED_SOCKET"
#: Where a client that is given no path (and finds no CAPTURED_SOCKET) looks, the first that
#: exists winning: the systemd units' socket, then the one `captured serve` makes on its embedded
#: default when started in the client's working directory (the README's Quick start).
SOCKET_CANDIDATES = ("/run/captured/capture.sock", os.path.join("captured-data", "capture.sock"))


def valid_name(s: object) -> bool:
    return isinstance(s, str) and NAME_PATTERN.fullmatch(s) is not None


def find_socket(explicit: str | None = None) -> str:
    """The capture socket's path: `explicit`, else $CAPTURED_SOCKET, else the first of
    `SOCKET_CANDIDATES` that exists (made absolute), else the systemd units' path."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(SOCKET_ENV):
        return env
    for candidate in SOCKET_CANDIDATES:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return SOCKET_CANDIDATES[0]
