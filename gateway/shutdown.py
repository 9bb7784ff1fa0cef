"""Graceful shutdown: on SIGTERM in-flight generations get `server.shutdown_grace_s`, then end
with an OpenAI-shaped error (an `error` event inside a stream) instead of being cut off.

uvicorn stops accepting connections at SIGTERM and waits `timeout_graceful_shutdown` for the
requests in flight; `Drain.begin` (called from the CLI's server when the signal arrives)
starts the clock, and `Drain.guard` wraps each request's chunk stream so that it ends cleanly
a little before uvicorn would cancel it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

from gateway.context import Chunk
from gateway.errors import Unavailable

MARGIN_S = 0.5  # end streams this long before uvicorn's own deadline


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # monotonic; set once shutdown begins

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, self.grace_s - MARGIN_S)

    def _error(self) -> Unavailable:
        return Unavailable("The gateway is shutting down; retry on another instance.",
                           code="shutting_down", retry_after=1)

    def next(self, it: AsyncIterator[Chunk]) -> Awaitable[Chunk]:
        """anext(it); once shutdown began, raises Unavailable when the grace period is over
        (the fused form of `guard`, for loops that pull chunks themselves)."""
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

    async def guard(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """`chunks`, ended with Unavailable once the grace period is over."""
        it = aiter(chunks)
        try:
            while True:
                if self.deadline is None:
                    try:
                        chunk = await anext(it)
                    except StopAsyncIteration:
                        return
                else:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        raise self._error()
                    try:
                        chunk = await asyncio.wait_for(anext(it), left)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise self._error() from None
                yield chunk
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()
