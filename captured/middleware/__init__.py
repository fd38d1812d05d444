"""Capture where inference happens: one line in an ASGI or WSGI model server.

    from captured.middleware import CaptureMiddleware          # ASGI 3 (FastAPI, Starlette, ...)
    app.add_middleware(CaptureMiddleware, socket_path="/run/captured/capture.sock")

    from captured.middleware import WSGICaptureMiddleware       # WSGI (Flask, Django, ...)
    app.wsgi_app = WSGICaptureMiddleware(app.wsgi_app, socket_path="/run/captured/capture.sock")

Both speak only the standard protocols (no framework is imported) and share `common`: which
requests are captured, SageMaker's headers, the counters (`stats()`). Each is imported when first
named, so a WSGI server never loads the asyncio client and an ASGI one never the WSGI wrapper.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captured.middleware.asgi import CaptureMiddleware
    from captured.middleware.common import MiddlewareStats
    from captured.middleware.wsgi import WSGICaptureMiddleware

__all__ = ["CaptureMiddleware", "MiddlewareStats", "WSGICaptureMiddleware"]

_HOMES = {
    "CaptureMiddleware": "captured.middleware.asgi",
    "MiddlewareStats": "captured.middleware.common",
    "WSGICaptureMiddleware": "captured.middleware.wsgi",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
