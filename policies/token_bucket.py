"""A per-minute token bucket: full at start, refills continuously, never above its size."""

from __future__ import annotations

import math
from collections.abc import Callable


class TokenBucket:
    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        if per_minute < 1:
            raise ValueError("a bucket needs at least 1 token per minute")
        self.size = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self.level = self.size
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.size, self.level + (now - self._at) * self.rate)
        self._at = now

    def wait_for(self, n: float) -> float:
        """Seconds until `n` tokens are there (0: now; inf: never, n is above the size)."""
        if n > self.size:
            return math.inf
        self._refill()
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.size, self.level + n)

    def resize(self, per_minute: int) -> None:
        """A new limit (a config reload): what was taken and not refilled yet stays taken."""
        if per_minute < 1:
            raise ValueError("a bucket needs at least 1 token per minute")
        self._refill()
        taken = self.size - self.level
        self.size = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.size - taken
