"""Graceful shutdown: on SIGTERM in-flight generations get `server.shutdown_grace_s`, then end
with an OpenAI-shaped error (an `error` event inside a stream) instead of being cut off.

uvicorn stops accepting connections at SIGTERM and waits `timeout_graceful_shutdown` for the
requests in flight; `Drain.begin` (called from the CLI's server when the signal arrives)
starts the clock, and each request pulls its chunks through `Drain.next`, so that its stream
ends cleanly a little before uvicorn would cancel it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

from gateway.core.context import Chunk
from gateway.core.errors import Unavailable

MARGIN_S = 0.5  # end streams this long before uvicorn's own deadline


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # monotonic; set once shutdown begins

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, self.grace_s - MARGIN_S)

    def _error(self) -> Unavailable:
        return Unavailable("The gateway is shutting down; retry on another instance.",
                           code="shutting_down", retry_after=1)

    def next(self, it: AsyncIterator[Chunk]) -> Awaitable[Chunk]:
        """anext(it); once shutdown began, raises Unavailable when the grace period is over."""
        if self.deadline is None:
            return anext(it)
        return self._next_before_deadline(it)

    async def _next_before_deadline(self, it: AsyncIterator[Chunk]) -> Chunk:
        assert self.deadline is not None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._error()
        try:
            return await asyncio.wait_for(anext(it), left)
        except TimeoutError:
            raise self._error() from None
