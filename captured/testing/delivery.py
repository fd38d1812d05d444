"""The delivery stage on its own, for tests and benchmarks: `running(delivery)`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from captured.delivery.queue import Delivery


@contextlib.asynccontextmanager
async def running(delivery: Delivery, own_prefix: str = "ep/") -> AsyncIterator[Delivery]:
    """Open the destination and run `delivery` for the block (as the daemon does in its task
    group); then cancel it, which abandons uploads in flight, and close the destination."""
    await delivery.open()
    task = asyncio.create_task(delivery.run([own_prefix]), name="delivery")
    try:
        yield delivery
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await delivery.close()
