"""Fair share among backlogged tenants of one priority: virtual token counters.

Each tenant has a counter of the weighted tokens it was served: prompt + output, divided by
its `weight` (tenants[].weight, 1.0 by default). Within one priority the admission queue
(policies/admission.py) grants the waiter whose tenant has the lowest counter first, FIFO
among equals, so backlogged tenants are served tokens in proportion to their weights whatever
their request sizes (the Virtual Token Counter of Sheng et al., as in AIBrix, the Gateway API
Inference Extension and llm-d).

- Charged at admission: prompt + the expected output (what tokens per minute is charged,
  DESIGN's one rule); settled to the answer's usage at the end (a retried attempt gives it
  all back; an error or a cancel keeps the charge, like the rate buckets).
- No banked credit: a tenant that starts waiting while none of its requests waits is lifted
  to the lowest counter among the tenants waiting at that priority, so a tenant idle for an
  hour does not then own the machine for an hour.
- Across processes (`shared_state`): every change is also a delta sent to one Redis hash,
  batched every FLUSH_S in one script that answers every counter; this process then orders
  its queue by the fleet's counters (plus its own deltas not yet sent). Redis down: the local
  counters go on alone (ordering only, never a limit, so `on_unavailable` does not apply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from policies.redis_scripts import FAIR_ADD

log = logging.getLogger("gateway.fair_share")

FLUSH_S = 0.05  # how often this process's deltas go to Redis (when any changed)
COUNTERS_TTL_S = 86400  # the shared counters expire a day after their last change


class Shared(Protocol):
    """What fair share needs of policies/redis_quotas.py's RedisQuotas."""

    def register(self, name: str, lua: str) -> None: ...

    async def run(self, name: str, keys: list[str], args: list[object]) -> Any: ...

    def key(self, name: str) -> str: ...


class FairShare:
    """Weighted tokens served per tenant (`counter`), in this process or across the fleet."""

    def __init__(self, shared: Shared | None = None) -> None:
        self.shared = shared
        self._served: dict[str, float] = {}  # this process's view (fleet's + unsent deltas)
        self._unsent: dict[str, float] = {}
        self._flush: asyncio.Task[None] | None = None
        if shared is not None:
            shared.register("FAIR_ADD", FAIR_ADD)

    def counter(self, tenant: str) -> float:
        return self._served.get(tenant, 0.0)

    def counters(self) -> dict[str, float]:
        return dict(self._served)

    def charge(self, tenant: str, tokens: float, weight: float) -> None:
        """`tokens` served to `tenant` (negative: given back), weighted."""
        if tokens:
            self._add(tenant, tokens / weight)

    def arrive(self, tenant: str, waiting: Iterable[str]) -> None:
        """`tenant` starts waiting while none of its requests waits: lifted to the lowest
        counter among the other tenants `waiting` at its priority (no credit banked)."""
        floor = min((self.counter(t) for t in waiting if t != tenant), default=None)
        if floor is not None and self.counter(tenant) < floor:
            self._add(tenant, floor - self.counter(tenant))

    def _add(self, tenant: str, delta: float) -> None:
        self._served[tenant] = self.counter(tenant) + delta
        if self.shared is None:
            return
        self._unsent[tenant] = self._unsent.get(tenant, 0.0) + delta
        if self._flush is None or self._flush.done():
            with contextlib.suppress(RuntimeError):  # no running loop: sent with the next one
                self._flush = asyncio.get_running_loop().create_task(self._send_later())

    async def _send_later(self) -> None:
        await asyncio.sleep(FLUSH_S)
        await self.send()

    async def send(self) -> None:
        """Send the deltas not yet sent; take the fleet's counters (plus any newer deltas)."""
        shared, deltas = self.shared, self._unsent
        if shared is None or not deltas:
            return
        self._unsent = {}
        args: list[object] = [COUNTERS_TTL_S * 1000]
        for tenant, delta in deltas.items():
            args += [tenant, repr(delta)]
        try:
            flat = await shared.run("FAIR_ADD", [shared.key("fair:served")], args)
        except Exception as exc:  # Down or a broken connection: the local counters go on
            log.debug("fair share: counters not shared this time (%s)", type(exc).__name__)
            return
        fleet = {_text(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
        for tenant, delta in self._unsent.items():  # charged while the script ran
            fleet[tenant] = fleet.get(tenant, 0.0) + delta
        self._served = fleet

    def carry_over(self, previous: FairShare) -> None:
        self._served, self._unsent = previous._served, previous._unsent


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
