"""Where a tenant's rate buckets and the leases on shared capacity are kept: in this process
(LocalQuotas, the default) or in Redis for every gateway process (policies/redis_quotas.py,
when `shared_state` is configured). Admission speaks only this interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from policies.leases import Bucket, LocalBook, Scope


class Quotas(Protocol):
    # True: limits hold across processes (admission then takes leases on shared scopes)
    shared: bool

    async def take(self, buckets: Sequence[Bucket]) -> float:
        """Every bucket's amount or none: 0.0 taken, else seconds until they would be."""

    async def settle(self, buckets: Sequence[Bucket]) -> None:
        """Add amounts back (a negative amount charges more), never above a bucket's size."""

    def new_lease(self) -> str: ...

    async def acquire(self, lease: str, scopes: Sequence[Scope]) -> int:
        """-1: held on every scope; else the index of the first scope that did not fit."""

    async def release(self, lease: str, scopes: Sequence[Scope]) -> None:
        """Drop the lease; completes even when the caller is cancelled meanwhile."""

    async def admit(self, buckets: Sequence[Bucket], lease: str,
                    scopes: Sequence[Scope]) -> tuple[float, int]:
        """take, then acquire, at once: (seconds to wait, -1) when a bucket is short (nothing
        taken); else the buckets are taken and (0.0, acquire's answer)."""

    async def finish(self, buckets: Sequence[Bucket], lease: str, scopes: Sequence[Scope]) -> None:
        """release, then settle, at once; completes even when the caller is cancelled."""

    async def changed(self, timeout: float) -> None:
        """Return when a lease was released here, or after `timeout` seconds."""

    def stats(self) -> dict[str, Any]:
        """For /debug/memory and /metrics."""


class LocalQuotas:
    """One process's buckets and leases (no expiry needed: the process is the holder)."""

    shared = False

    def __init__(self, clock: Callable[[], float]) -> None:
        self.book = LocalBook(clock)
        self._ids = itertools.count()
        self._released = asyncio.Event()

    async def take(self, buckets: Sequence[Bucket]) -> float:
        return self.book.take(buckets)

    async def settle(self, buckets: Sequence[Bucket]) -> None:
        self.book.settle(buckets)

    def new_lease(self) -> str:
        return f"local:{next(self._ids)}"

    async def acquire(self, lease: str, scopes: Sequence[Scope]) -> int:
        return self.book.acquire(lease, scopes, math.inf)

    async def release(self, lease: str, scopes: Sequence[Scope]) -> None:
        self.book.release(lease, [s.key for s in scopes])
        self._released.set()
        self._released = asyncio.Event()

    async def admit(self, buckets: Sequence[Bucket], lease: str,
                    scopes: Sequence[Scope]) -> tuple[float, int]:
        wait = await self.take(buckets) if buckets else 0.0
        if wait > 0:
            return wait, -1
        return 0.0, await self.acquire(lease, scopes) if scopes else -1

    async def finish(self, buckets: Sequence[Bucket], lease: str, scopes: Sequence[Scope]) -> None:
        if scopes:
            await self.release(lease, scopes)
        if buckets:
            await self.settle(buckets)

    async def changed(self, timeout: float) -> None:
        await wait_event(self._released, timeout)

    def stats(self) -> dict[str, Any]:
        return {"up": True, "processes": 1}


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
