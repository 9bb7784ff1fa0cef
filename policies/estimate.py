"""How long an answer will be, before it is generated: the p90 of the completion lengths
seen for the same tenant, model and adapter, bounded by the request's own output limit.

DESIGN "Output length, reservations and quotas: one rule": tokens-per-minute quotas charge
prompt + this estimate at admission and settle to the answer's usage at the end; KV admission
reserves prompt + the estimate where a backend says `kv_admission: estimate` (else the limit,
"worst_case": see `gateway.core.kv.kv_output_tokens`). Until `min_samples` answers were seen for a key the
estimate is the limit itself (worst case).

Plain Python and per process: each gateway process learns from the answers it served. The
window is bounded (the last `window` lengths per key) and keys come from configured tenants,
models and adapters, so memory is bounded too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gateway.core.kv import KV_ADMISSION_MODES, kv_output_tokens

__all__ = ["KV_ADMISSION_MODES", "Estimates", "kv_output_tokens"]

Key = tuple[str, str, str]  # tenant, model, adapter ("" for the base model)


@dataclass(slots=True)
class _Lengths:
    seen: deque[int]
    p90: int | None = None  # cached; None: recompute on the next read

    def add(self, n: int) -> None:
        self.seen.append(n)
        self.p90 = None


@dataclass
class Estimates:
    """Completion-length p90 per (tenant, model, adapter)."""

    quantile: float = 0.9
    min_samples: int = 20
    window: int = 256
    _keys: dict[Key, _Lengths] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.quantile <= 1 or self.min_samples < 1 or self.window < self.min_samples:
            raise ValueError("quantile in (0, 1], min_samples >= 1, window >= min_samples")

    def observe(self, key: Key, completion_tokens: int) -> None:
        """An answer of `completion_tokens` tokens was generated for `key`."""
        if completion_tokens < 0:
            return
        lengths = self._keys.get(key)
        if lengths is None:
            lengths = self._keys[key] = _Lengths(deque(maxlen=self.window))
        lengths.add(completion_tokens)

    def samples(self, key: Key) -> int:
        lengths = self._keys.get(key)
        return 0 if lengths is None else len(lengths.seen)

    def p90(self, key: Key) -> int | None:
        """The configured quantile (nearest rank) of the lengths seen; None: too few yet."""
        lengths = self._keys.get(key)
        if lengths is None or len(lengths.seen) < self.min_samples:
            return None
        if lengths.p90 is None:
            ordered = sorted(lengths.seen)
            lengths.p90 = ordered[max(0, math.ceil(self.quantile * len(ordered)) - 1)]
        return lengths.p90

    def expected(self, key: Key, limit: int) -> int:
        """Output tokens to expect of a request whose output limit is `limit`: the p90 bounded
        by the limit, or the limit itself until enough answers were seen."""
        p90 = self.p90(key)
        return limit if p90 is None else min(limit, p90)
