"""Engine events to asyncio queues, delivered in batches.

The engine thread finishes a step with one event per running sequence. Posting each through
`loop.call_soon_threadsafe` would wake the event loop once per sequence per step (a self-pipe
write each, and as many GIL hand-offs); the mailbox wakes it once per batch of posts:

    post(q, ev): pending += (q, ev); wake the loop unless a wake-up is already scheduled
    (on the loop) deliver(): take all pending; q.put_nowait(ev) for each, in posting order
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[T], T]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[T], item: T) -> None:
        """Thread-safe; raises RuntimeError once the loop is closed (as call_soon_threadsafe)."""
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
