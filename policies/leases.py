"""The shared-state operations in plain Python: what the Lua scripts of
policies/redis_scripts.py do in Redis, done in one process.

Used where Redis cannot answer (`on_unavailable: local_share`, with every limit divided by
the number of live gateway processes) and as the reference the scripts are tested against.

- Rate buckets: `take(buckets)` takes every amount or none, and says how long to wait for
  the largest shortfall; `settle(buckets)` adds amounts back (negative: a debt), never above
  the size. The size is given at each call (a changed limit applies at the next check);
  a bucket holds one minute's worth and refills continuously.
- Leases: `acquire(lease, scopes)` holds `amount` of each scope's `limit` for `lease` until
  `now + ttl`, all scopes or none; expired leases are reclaimed before any check; `renew`
  moves a live lease's expiry (never revives a reclaimed one); `release` drops it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    per_minute: float  # the size (one minute's worth)
    amount: float  # to take (take) or to add back (settle; negative: charge more)


@dataclass(frozen=True, slots=True)
class Scope:
    key: str
    limit: int  # the most the live leases of this scope may hold together
    amount: int  # what this lease holds of it (1 for a concurrency slot, bytes for KV)


@dataclass(slots=True)
class _Level:
    taken: float  # taken and not yet refilled (so a changed limit keeps this minute's use)
    at: float


@dataclass
class _Leases:
    expiry: dict[str, float] = field(default_factory=dict)
    amount: dict[str, int] = field(default_factory=dict)
    total: int = 0


class LocalBook:
    """Rate buckets and leases of one process. `clock`: seconds (monotonic)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._levels: dict[str, _Level] = {}
        self._scopes: dict[str, _Leases] = {}

    # ---- rate buckets -------------------------------------------------------------------

    def _level(self, b: Bucket, now: float) -> float:
        """What is left (negative after a lower limit, until refilled)."""
        held = self._levels.get(b.key)
        if held is None:
            return b.per_minute
        return b.per_minute - max(0.0, held.taken - (now - held.at) * b.per_minute / 60.0)

    def take(self, buckets: Sequence[Bucket]) -> float:
        """Take every bucket's amount, or none: 0.0 when taken, else seconds to wait (inf:
        an amount above a bucket's size)."""
        now = self.clock()
        levels = [self._level(b, now) for b in buckets]
        wait = 0.0
        for b, level in zip(buckets, levels, strict=True):
            if b.amount > b.per_minute:
                wait = math.inf  # more than the bucket ever holds
            elif level < b.amount:
                wait = max(wait, (b.amount - level) * 60.0 / b.per_minute)
        if wait > 0:
            return wait
        for b, level in zip(buckets, levels, strict=True):
            self._levels[b.key] = _Level(b.per_minute - level + b.amount, now)
        return 0.0

    def settle(self, buckets: Sequence[Bucket]) -> None:
        now = self.clock()
        for b in buckets:
            level = min(b.per_minute, self._level(b, now) + b.amount)
            self._levels[b.key] = _Level(b.per_minute - level, now)

    def level(self, key: str, per_minute: float) -> float:
        return self._level(Bucket(key, per_minute, 0), self.clock())

    # ---- leases -------------------------------------------------------------------------

    def _reclaimed(self, key: str, now: float) -> _Leases:
        held = self._scopes.setdefault(key, _Leases())
        for lease in [k for k, t in held.expiry.items() if t <= now]:
            self._drop(held, lease)
        return held

    @staticmethod
    def _drop(held: _Leases, lease: str) -> None:
        held.expiry.pop(lease, None)
        held.total -= held.amount.pop(lease, 0)

    def acquire(self, lease: str, scopes: Sequence[Scope], ttl: float) -> int:
        """-1: held on every scope; else the index of the first scope that did not fit."""
        now = self.clock()
        held = [self._reclaimed(s.key, now) for s in scopes]
        for i, (s, h) in enumerate(zip(scopes, held, strict=True)):
            if h.total + s.amount > s.limit:
                return i
        for s, h in zip(scopes, held, strict=True):
            h.expiry[lease] = now + ttl
            h.amount[lease] = s.amount
            h.total += s.amount
        return -1

    def renew(self, lease: str, keys: Sequence[str], ttl: float) -> int:
        """Move a live lease's expiry on each scope; returns on how many it was still held."""
        now = self.clock()
        renewed = 0
        for key in keys:
            held = self._reclaimed(key, now)
            if lease in held.expiry:
                held.expiry[lease] = now + ttl
                renewed += 1
        return renewed

    def release(self, lease: str, keys: Sequence[str]) -> None:
        for key in keys:
            held = self._scopes.get(key)
            if held is not None:
                self._drop(held, lease)
                if not held.expiry:
                    del self._scopes[key]

    def held(self, key: str) -> int:
        """What the live leases of a scope hold now."""
        return self._reclaimed(key, self.clock()).total
