"""Bytes promised to admitted requests, per backend and per tenant, and how fast they drain.

Plain Python, shared by the degrade and admission policies and read by telemetry and
/debug/memory. The KV arithmetic is the core's (gateway/core/kv.py, shared with the engine):
a request needs (prompt + max_tokens) tokens rounded up to whole blocks of block_size tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.context import Reservation


@dataclass
class Pool:
    """One backend's KV budget (None: the backend reports no capacity, only quotas apply)."""

    budget: int | None
    reserved: int = 0
    queued: int = 0  # bytes asked by requests waiting for admission
    by_tenant: dict[str, int] = field(default_factory=dict)
    drained: deque[tuple[float, int]] = field(default_factory=deque)  # (time, bytes released)
    long_cap: int | None = None  # with length lanes: what long requests may hold together
    long_reserved: int = 0

    def fits(self, kv_bytes: int, long: bool = False) -> bool:
        if long and self.long_cap is not None and self.long_reserved + kv_bytes > self.long_cap:
            return False
        return self.budget is None or self.reserved + kv_bytes <= self.budget

    def tenant_bytes(self, tenant: str) -> int:
        return self.by_tenant.get(tenant, 0)


class Reservations:
    def __init__(self, clock: Callable[[], float], drain_window_s: float = 30.0) -> None:
        self.clock = clock
        self.drain_window_s = drain_window_s
        self.pools: dict[str, Pool] = {}
        self._started = clock()

    def pool(self, backend: str, budget: int | None, long_cap: int | None = None) -> Pool:
        """The backend's pool, (re)learning its budget (and long lane) from the latest
        capacity()."""
        pool = self.pools.get(backend)
        if pool is None:
            pool = self.pools[backend] = Pool(budget)
        elif budget is not None:
            pool.budget = budget
        pool.long_cap = long_cap
        return pool

    def reserve(self, res: Reservation) -> None:
        pool = self.pools[res.backend]
        if not pool.fits(res.kv_bytes, res.long):
            raise ValueError(f"{res.kv_bytes} bytes do not fit backend {res.backend}'s budget")
        pool.reserved += res.kv_bytes
        pool.long_reserved += res.kv_bytes if res.long else 0
        pool.by_tenant[res.tenant] = pool.tenant_bytes(res.tenant) + res.kv_bytes

    def release(self, res: Reservation) -> None:
        if res.released:
            return
        res.released = True
        pool = self.pools[res.backend]
        pool.reserved -= res.kv_bytes
        pool.long_reserved -= res.kv_bytes if res.long else 0
        left = pool.tenant_bytes(res.tenant) - res.kv_bytes
        if left:
            pool.by_tenant[res.tenant] = left
        else:
            pool.by_tenant.pop(res.tenant, None)
        now = self.clock()
        pool.drained.append((now, res.kv_bytes))
        self._trim(pool, now)

    def _trim(self, pool: Pool, now: float) -> None:
        while pool.drained and pool.drained[0][0] < now - self.drain_window_s:
            pool.drained.popleft()

    def drain_rate(self, backend: str) -> float | None:
        """Bytes per second released over the recent window; None before anything drained."""
        pool = self.pools.get(backend)
        if pool is None:
            return None
        now = self.clock()
        self._trim(pool, now)
        if not pool.drained:
            return None
        span = min(self.drain_window_s, max(now - self._started, 1.0))
        return sum(b for _, b in pool.drained) / span

    def wait_estimate(self, backend: str, kv_bytes: int) -> float | None:
        """Seconds until `kv_bytes` more (behind everything queued) would fit; None: unknown."""
        pool = self.pools.get(backend)
        if pool is None or pool.budget is None:
            return 0.0
        short = pool.reserved + pool.queued + kv_bytes - pool.budget
        if short <= 0:
            return 0.0
        rate = self.drain_rate(backend)
        return None if not rate else short / rate

    def total_reserved(self) -> int:
        return sum(p.reserved for p in self.pools.values())

    def reserved_by_tenant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool in self.pools.values():
            for tenant, n in pool.by_tenant.items():
                out[tenant] = out.get(tenant, 0) + n
        return out

    def snapshot(self) -> dict[str, Any]:
        """For /debug/memory and metrics: reserved bytes in total, per backend, per tenant."""
        return {
            "reserved_bytes": self.total_reserved(),
            "by_tenant": self.reserved_by_tenant(),
            "backends": {
                name: {"budget_bytes": p.budget, "reserved_bytes": p.reserved,
                       "queued_bytes": p.queued, "by_tenant": dict(p.by_tenant)}
                for name, p in self.pools.items()
            },
        }
