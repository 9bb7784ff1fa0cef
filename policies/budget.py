"""Spend budgets: `limits.budget: {amount, period: day | week | month}` per tenant, in the
models' price unit, over calendar periods in UTC (weeks start on Monday).

The rule (DESIGN's one rule for quotas, made exact for money):
- At admission a request reserves its prompt's cost plus its output estimate's cost
  (policies/estimate.py); the rest of its worst case (prompt + its output limit) is its
  *exposure*. It is admitted only when its worst case fits what is left of the budget minus
  everything reserved and exposed by the requests in flight, so even if every one of them
  runs to its limit the budget holds: spent + sum(worst cases in flight) <= amount, always.
  (Reserving the worst case instead, once the estimates no longer fit beside the exposure,
  would admit nothing more: the same sum decides.) Otherwise: 429 `budget_exceeded` with
  `x-ratelimit-reset-budget` (seconds until the period resets) and Retry-After: the reset, or
  one second when requests in flight hold what would let it in (they settle soon).
- At the end the reservation is settled to the answer's cost (the price of the model that
  answered, as in its usage record); a retried attempt (failover) is settled to nothing; one
  that ended without usage (an error, a cancel) keeps its estimate. A shadow request
  (rollouts) is never charged.
- Amounts are kept in integer nano-units of the price (no float drift); costs round as the
  usage records' do (9 decimals).

Across workers and replicas (`shared_state`), reserve and settle are one atomic Redis script
each (policies/redis_scripts.py), idempotent per request id: a retried settle never charges
twice. A reservation is a lease renewed with the others (lease_ttl_s): a gateway killed
mid-request stops renewing it and it is reclaimed by the next reserve. Each period's keys
expire by themselves after the period ends. A settle Redis did not answer is retried every
second (idempotent, so safe) until it lands. Redis down: `on_unavailable` applies as for the
other limits (`local_share`: this process's own book with the budget divided by the live
processes; `reject`: 503).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.config import Budget, Price
from gateway.core.errors import RateLimited
from policies import redis_scripts
from policies.redis_quotas import Down, RedisQuotas

log = logging.getLogger("gateway.budget")

NANO = 1_000_000_000  # price units -> integer nano-units
KEEP_S = 3600.0  # a period's keys live this long past its end (late settles, the admin view)
SETTLE_RETRY_S = 1.0
MAX_PENDING_SETTLES = 100_000  # settles waiting for Redis, beyond which the oldest are dropped
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
IN_FLIGHT_RETRY_S = 1.0  # Retry-After when requests in flight hold the room


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """The calendar period (UTC) holding `now` (epoch seconds): (start, end) epoch seconds."""
    t = time.gmtime(now)
    day = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    if period == "day":
        return day, day + 86400
    if period == "week":
        start = day - t.tm_wday * 86400  # tm_wday: Monday is 0
        return start, start + 7 * 86400
    if period == "month":
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return start, calendar.timegm((year, month, 1, 0, 0, 0))
    raise ValueError(f"unknown budget period {period!r}")


def nanos(cost: float) -> int:
    """A cost in nano-units, rounded as a usage record rounds it (9 decimals)."""
    return round(cost * NANO)


def cost_nanos(price: Price, prompt: int, completion: int, cached: int = 0) -> int:
    return nanos(price.cost(prompt, completion, cached))


@dataclass(slots=True)
class Charge:
    """What one admitted request holds of its tenant's budget until settled."""

    id: str
    tenant: str
    start: int  # the period's start (epoch s): the keys it was reserved under
    end: int
    estimate: int  # nano-units reserved
    worst: int
    local: bool = False  # reserved in this process's book (no shared state, or Redis down)
    settled: bool = False


@dataclass(slots=True)
class Spend:
    spent: int = 0
    reserved: int = 0
    exposure: int = 0  # in flight: worst cases minus what they reserved
    charges: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (reserved, worst)
    settled: set[str] = field(default_factory=set)


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"


class Budgets:
    """Every tenant's budget: in this process, or in Redis with `shared` (RedisQuotas).
    `clock`: epoch seconds (wall time; injected by tests for period rollover)."""

    def __init__(
        self, shared: RedisQuotas | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.shared = shared
        self.clock = clock
        self.book: dict[tuple[str, int], Spend] = {}  # (tenant, period start) -> its spend
        self._ids = itertools.count()
        self._pending: list[tuple[Charge, int]] = []  # settles Redis did not answer
        # the most this process saw spent per (tenant, period start): spending only grows
        # within a period, so a request whose least possible cost does not fit beside it is
        # refused before its prompt is counted (refuse_spent)
        self._seen: dict[tuple[str, int], int] = {}
        self._retry: asyncio.Task[None] | None = None
        if shared is not None:
            for name in ("BUDGET_RESERVE", "BUDGET_SETTLE", "BUDGET_READ"):
                shared.register(name, getattr(redis_scripts, name))

    # ---- keys ---------------------------------------------------------------------------

    def _keys(self, tenant: str, start: int) -> list[str]:
        if self.shared is None:
            raise RuntimeError("no shared state")
        base = self.shared.key(f"budget:{tenant}:{start}")
        return [base, f"{base}:leases", f"{base}:settled"]

    def _ttl_ms(self, end: int) -> int:
        return max(1000, int((end - self.clock() + KEEP_S) * 1000))

    def _spend(self, tenant: str, start: int) -> Spend:
        key = (tenant, start)
        spend = self.book.get(key)
        if spend is None:
            for old in [k for k in self.book if k[0] == tenant and k[1] < start]:
                del self.book[old]  # a past period of this tenant: nothing reads it any more
            spend = self.book[key] = Spend()
        return spend

    # ---- reserve and settle ---------------------------------------------------------------

    async def reserve(self, tenant: str, budget: Budget, estimate: int, worst: int) -> Charge:
        """Reserve `estimate` nano-units with `worst` as the request's worst case; raises
        BudgetExceeded (or Unavailable under on_unavailable: reject)."""
        now = self.clock()
        start, end = period_bounds(budget.period, now)
        amount = nanos(budget.amount)
        charge = Charge(self._new_id(), tenant, start, end, estimate, worst)
        if self.shared is not None:
            try:
                ok, spent, reserved, exposure = await self.shared.run(
                    "BUDGET_RESERVE",
                    self._keys(tenant, start)[:2],
                    [
                        charge.id,
                        amount,
                        estimate,
                        worst,
                        int(self.shared.cfg.lease_ttl_s * 1000),
                        self._ttl_ms(end),
                    ],
                )
            except Down:
                self.shared.fallback()  # reject: 503
                amount //= self.shared.processes
            else:
                self._saw(tenant, start, int(spent))
                if int(ok):
                    self.shared.hold(charge.id, self._keys(tenant, start)[1:2])
                    return charge
                raise self._refusal(
                    budget, amount, int(spent), int(reserved), int(exposure), worst, end - now
                )
        spend = self._spend(tenant, start)
        if amount - spend.spent - spend.reserved - spend.exposure < worst:
            raise self._refusal(
                budget, amount, spend.spent, spend.reserved, spend.exposure, worst, end - now
            )
        self._saw(tenant, start, spend.spent)
        spend.reserved += estimate
        spend.exposure += worst - estimate
        spend.charges[charge.id] = (estimate, worst)
        charge.local = True
        return charge

    def _saw(self, tenant: str, start: int, spent: int) -> None:
        key = (tenant, start)
        if spent > self._seen.get(key, -1):
            if key not in self._seen:  # a new period: the past ones are of no more use
                for old in [k for k in self._seen if k[0] == tenant]:
                    del self._seen[old]
            self._seen[key] = spent

    def refuse_spent(self, tenant: str, budget: Budget, least: int) -> None:
        """Cheap, before a large request's prompt is counted (no round trip): BudgetExceeded
        when `least` (a lower bound of its cost, nano-units) does not fit beside what this
        process last saw spent this period. Never refuses what reserve() would admit."""
        now = self.clock()
        start, end = period_bounds(budget.period, now)
        spent = self._seen.get((tenant, start))
        amount = nanos(budget.amount)
        if spent is not None and least > 0 and amount - spent < least:
            raise self._refusal(budget, amount, spent, 0, 0, least, end - now)

    def _new_id(self) -> str:
        if self.shared is not None:
            return self.shared.new_lease()  # unique across the fleet (process id + counter)
        return f"local:{next(self._ids)}"

    def _refusal(
        self,
        budget: Budget,
        amount: int,
        spent: int,
        reserved: int,
        exposure: int,
        worst: int,
        reset_s: float,
    ) -> BudgetExceeded:
        reset = max(1, math.ceil(reset_s))
        in_flight = amount - spent >= worst  # requests in flight hold the room it needs
        retry = IN_FLIGHT_RETRY_S if in_flight else float(reset)
        why = (
            "requests in flight may use the rest of it"
            if in_flight
            else "this request's worst case does not fit what is left"
        )
        return BudgetExceeded(
            f"Your {ADJECTIVE[budget.period]} budget of {budget.amount:g} is spent or reserved ({why}); "
            f"it resets in {reset} s.",
            retry_after=retry,
            headers={"x-ratelimit-reset-budget": str(reset)},
        )

    async def settle(self, charge: Charge, actual: int) -> None:
        """Drop the reservation and charge `actual` nano-units, once (a second call is a
        no-op; in Redis too, per id)."""
        if charge.settled:
            return
        charge.settled = True
        if charge.local:
            spend = self._spend(charge.tenant, charge.start)
            held = spend.charges.pop(charge.id, None)
            if held is not None:
                spend.reserved -= held[0]
                spend.exposure -= held[1] - held[0]
            spend.spent += actual
            self._saw(charge.tenant, charge.start, spend.spent)
            return
        if self.shared is not None:
            self.shared.forget(charge.id)
        if not await self._settle_shared(charge, actual):
            self._pending.append((charge, actual))
            del self._pending[:-MAX_PENDING_SETTLES]
            if self._retry is None or self._retry.done():
                self._retry = asyncio.ensure_future(self._retry_settles())

    async def _settle_shared(self, charge: Charge, actual: int) -> bool:
        if self.shared is None:
            return True
        try:
            await self.shared.run(
                "BUDGET_SETTLE",
                self._keys(charge.tenant, charge.start),
                [charge.id, actual, self._ttl_ms(charge.end)],
            )
        except Down:
            return False
        return True

    async def _retry_settles(self) -> None:
        while self._pending:
            await asyncio.sleep(SETTLE_RETRY_S)
            pending, self._pending = self._pending, []
            for i, (charge, actual) in enumerate(pending):
                if not await self._settle_shared(charge, actual):
                    self._pending[:0] = pending[i:]
                    break

    # ---- for /metrics, /admin/usage -------------------------------------------------------

    async def read(self, tenant: str, budget: Budget) -> dict[str, Any]:
        """The tenant's current period: amount, spent, reserved (in flight, estimates),
        exposure (in flight, worst cases beyond them), remaining and the reset, in price units."""
        now = self.clock()
        start, end = period_bounds(budget.period, now)
        spend = self.book.get((tenant, start), Spend())
        spent, reserved, exposure = spend.spent, spend.reserved, spend.exposure
        source = "local"
        if self.shared is not None:
            with contextlib.suppress(Down):
                s, r, e = await self.shared.run("BUDGET_READ", self._keys(tenant, start)[:2], [])
                spent, reserved, exposure = int(s), int(r), int(e)
                source = "shared"
        amount = nanos(budget.amount)
        return {
            "period": budget.period,
            "period_start": start,
            "resets_in_s": end - now,
            "amount": budget.amount,
            "spent": spent / NANO,
            "reserved": reserved / NANO,
            "exposure": exposure / NANO,
            "remaining": max(0, amount - spent - reserved) / NANO,
            "spent_ratio": spent / amount,
            "source": source,
        }

    def carry_over(self, previous: Budgets) -> None:
        """A config reload: the book and the settles waiting for Redis go on."""
        self.book, self._pending, self._retry = previous.book, previous._pending, previous._retry
        self._ids = previous._ids
