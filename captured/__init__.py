"""captured: SageMaker-compatible Data Capture for any inference host.

The model server imports `CaptureClient` (threads) or `AsyncCaptureClient` (asyncio), or wraps
its app in `captured.middleware`; the `captured serve` daemon samples, encodes, spools and
delivers; `captured.read()` reads captures back (ours and SageMaker's), see `captured.reader`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"
__all__ = ["AsyncCaptureClient", "CaptureClient", "__version__", "read"]

if TYPE_CHECKING:
    from captured.client.aio import AsyncCaptureClient
    from captured.client.sync import CaptureClient
    from captured.reader import read


def __getattr__(name: str) -> Any:
    # Lazy: `import captured` in a model server should not pay for the daemon's imports.
    if name == "CaptureClient":
        from captured.client.sync import CaptureClient

        return CaptureClient
    if name == "AsyncCaptureClient":
        from captured.client.aio import AsyncCaptureClient

        return AsyncCaptureClient
    if name == "read":
        from captured.reader import read

        return read
    raise AttributeError(name)
