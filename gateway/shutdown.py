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
from typing import Any

from gateway.core.context import Chunk
from gateway.core.errors import Unavailable

MARGIN_S = 0.5  # end streams this long before uvicorn's own deadline


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # monotonic; set once shutdown begins
        # requests' tasks while they wait for a chunk (a wait begun before shutdown has no
        # deadline of its own: at the deadline the drain cuts it; see _pull)
        self._pulling: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, self.grace_s - MARGIN_S)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_later(max(0.0, self.grace_s - MARGIN_S), self._cut_waits)

    def _cut_waits(self) -> None:
        """The grace is over: every request still waiting for a chunk it asked for before
        shutdown began ends with the shutting_down error (raised by _pull)."""
        for task in list(self._pulling):
            if not task.done():
                self._cut.add(task)
                task.cancel()

    async def _pull(self, it: AsyncIterator[Chunk]) -> Chunk:
        task = asyncio.current_task()
        if task is None:
            return await anext(it)
        self._pulling.add(task)
        try:
            return await anext(it)
        except asyncio.CancelledError:
            if task in self._cut and self.deadline is not None:
                self._cut.discard(task)
                task.uncancel()
                raise self._error() from None
            raise
        finally:
            self._pulling.discard(task)

    def _error(self) -> Unavailable:
        return Unavailable("The gateway is shutting down; retry on another instance.",
                           code="shutting_down", retry_after=1)

    def next(self, it: AsyncIterator[Chunk]) -> Awaitable[Chunk]:
        """anext(it); once shutdown began, raises Unavailable when the grace period is over."""
        if self.deadline is None:
            return self._pull(it)
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
