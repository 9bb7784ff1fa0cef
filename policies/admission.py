"""admission: reserve a request's KV bytes before dispatch, or queue it, or refuse it.

Order of checks, each with the status a client can act on:
  never fits the backend's whole KV budget             -> 400 context_length_exceeded
  never fits the tenant's share / tokens per minute    -> 429, x-should-retry: false
  requests or tokens per minute spent                  -> 429, Retry-After = bucket refill
  otherwise wait in the queue (priority, then the tenant holding fewer bytes, then FIFO) until
  the bytes fit the budget and the tenant's concurrency and KV share; past the queue timeout
  or the deadline: 429 if the tenant's own limits held it, else 503, both with a Retry-After
  from the observed drain rate.

The sum of reservations on a backend never exceeds its budget (Reservations.reserve refuses).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from gateway.core.config import TenantConfig
from gateway.core.context import Decision, RequestContext, Reservation, Usage
from gateway.core.errors import ContextLengthExceeded, GatewayError, RateLimited, Unavailable
from gateway.core.policy import Outcome, Policy, passed
from policies.base import PolicyEnv
from policies.demand import Demand, demand
from policies.token_bucket import TokenBucket

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}
NO_RETRY = {"x-should-retry": "false"}
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class AdmissionConfig:
    queue_timeout_s: float = 10.0  # longest wait in the admission queue
    max_queue: int = 1024  # waiting requests beyond this are refused at once
    drain_window_s: float = 30.0  # how far back the drain rate (for Retry-After) looks

    def __post_init__(self) -> None:
        if self.queue_timeout_s < 0 or self.max_queue < 0 or self.drain_window_s <= 0:
            raise ValueError("queue_timeout_s and max_queue must be >= 0, drain_window_s > 0")


class TenantState:
    """A tenant's live quotas: rate buckets and requests admitted now."""

    def __init__(self, cfg: TenantConfig, env: PolicyEnv) -> None:
        limits = cfg.limits
        self.cfg = cfg
        self.rpm = TokenBucket(limits.requests_per_minute, env.clock) if limits.requests_per_minute else None
        self.tpm = TokenBucket(limits.tokens_per_minute, env.clock) if limits.tokens_per_minute else None
        self.active = 0

    def reconfigure(self, cfg: TenantConfig, env: PolicyEnv) -> None:
        """A config reload: the new limits apply; buckets keep what was taken, requests
        admitted stay counted (in place, so every waiter holding this state sees it)."""
        limits = cfg.limits
        for attr, per_minute in (("rpm", limits.requests_per_minute),
                                 ("tpm", limits.tokens_per_minute)):
            bucket: TokenBucket | None = getattr(self, attr)
            if per_minute is None:
                setattr(self, attr, None)
            elif bucket is None:
                setattr(self, attr, TokenBucket(per_minute, env.clock))
            else:
                bucket.resize(per_minute)
        self.cfg = cfg

    def share_cap(self, budget: int | None) -> int | None:
        share = self.cfg.limits.max_kv_share
        return None if share is None or budget is None else int(share * budget)


@dataclass(eq=False)
class Waiter:
    ctx: RequestContext
    tenant: TenantState
    need: Demand
    rank: int
    seq: int
    future: asyncio.Future[Reservation] = field(repr=False)
    held_by: str = "capacity"  # what kept it waiting last: "capacity" or "tenant"


class Admission:
    name = "admission"
    Config = AdmissionConfig

    def __init__(self, env: PolicyEnv, cfg: AdmissionConfig) -> None:
        self.env = env
        self.reservations = env.reservations
        self.reservations.drain_window_s = cfg.drain_window_s  # the drain rate behind Retry-After
        self.cfg = cfg
        self._tenants: dict[str, TenantState] = {}
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()

    def carry_over(self, previous: Policy) -> None:
        """A config reload: the previous chain's admission hands over its live state (the
        tenants' quotas and requests admitted, the queue), so both serve one queue and one
        count while requests admitted before the reload finish; limits become the new ones."""
        tenants, waiters = getattr(previous, "_tenants", None), getattr(previous, "_waiters", None)
        if not isinstance(tenants, dict) or not isinstance(waiters, list):
            return
        self._tenants, self._waiters, self._seq = tenants, waiters, previous._seq  # type: ignore[attr-defined]
        for name, state in tenants.items():
            cfg = self.env.tenants.get(name)
            if cfg is not None:
                state.reconfigure(cfg, self.env)

    # ---- for telemetry --------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # ---- the policy -----------------------------------------------------------------------

    async def apply(self, ctx: RequestContext) -> Decision:
        tenant = self._tenant(self.env.tenant(ctx))
        need = demand(self.env.backend(ctx), ctx)
        pool = self.reservations.pool(ctx.backend, need.budget)
        self._refuse_impossible(tenant, need)
        self._refuse_over_rate(tenant, need)
        if tenant.rpm is not None:
            tenant.rpm.take(1)
        if tenant.tpm is not None:
            tenant.tpm.take(need.tokens)
        if not self._waiters and self._tenant_fits(ctx, tenant, need) and pool.fits(need.kv_bytes):
            # Nobody queued and it fits: what queueing then dispatching would grant at once,
            # without a future and a queue pass (the common case, on the hot path).
            return self._admitted(ctx, self._reserve(ctx, tenant, need), 0.0)
        waiter = Waiter(ctx, tenant, need, PRIORITY_RANK[tenant.cfg.priority], next(self._seq),
                        asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        pool.queued += need.kv_bytes
        start = self.env.clock()
        self._dispatch()
        try:
            res = await self._wait(waiter)
        finally:
            ctx.queue_seconds = self.env.clock() - start
        return self._admitted(ctx, res, ctx.queue_seconds)

    def _admitted(self, ctx: RequestContext, res: Reservation, queued_s: float) -> Decision:
        ctx.queue_seconds = queued_s
        ctx.reservation = res
        ctx.memory.kv_bytes_reserved = res.kv_bytes
        reason = f"reserved {res.kv_bytes} KV bytes"
        if res.adapter_bytes:
            reason += f" and {res.adapter_bytes} adapter bytes"
        return passed(self.name, f"{reason} after {ctx.queue_seconds * 1000:.0f} ms")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        res = ctx.reservation
        if isinstance(res, Reservation) and not res.released:
            self._release(res)
            self._refund(res, outcome, ctx.usage)

    def _refund(self, res: Reservation, outcome: Outcome, usage: Usage | None) -> None:
        """The rate buckets keep what a request used, not what it might have: an attempt that
        failed over to another backend gives back its request and tokens (the next attempt is
        charged), a finished one the tokens of max_tokens it did not generate."""
        tenant = self._tenants.get(res.tenant)
        if tenant is None:
            return
        if outcome == "retried":
            if tenant.rpm is not None:
                tenant.rpm.give_back(1)
            if tenant.tpm is not None:
                tenant.tpm.give_back(res.tokens)
        elif outcome == "ok" and usage is not None and tenant.tpm is not None:
            tenant.tpm.give_back(max(0, res.tokens - usage.total_tokens))

    # ---- refusals before queueing ---------------------------------------------------------

    def _tenant(self, cfg: TenantConfig) -> TenantState:
        state = self._tenants.get(cfg.name)
        if state is None:
            state = self._tenants[cfg.name] = TenantState(cfg, self.env)
        return state

    def _refuse_impossible(self, tenant: TenantState, need: Demand) -> None:
        if need.budget is not None and need.kv_bytes > need.budget:
            raise ContextLengthExceeded(
                f"The prompt ({need.prompt_tokens} tokens) plus max_tokens ({need.max_tokens}) "
                f"need {need.kv_bytes} bytes of KV cache; this model's whole budget is "
                f"{need.budget} bytes. Shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        cap = tenant.share_cap(need.budget)
        if cap is not None and need.kv_bytes > cap:
            raise RateLimited(
                f"This request needs {need.kv_bytes} bytes of KV cache, more than your "
                f"share of {cap} bytes. Shorten the prompt or lower max_tokens.",
                code="kv_share_exceeded", retry_after=MAX_RETRY_AFTER_S, headers=NO_RETRY,
            )
        if tenant.tpm is not None and need.tokens > tenant.tpm.size:
            raise RateLimited(
                f"This request counts {need.tokens} tokens, more than your limit of "
                f"{tenant.tpm.size:.0f} tokens per minute.",
                code="tokens_per_minute_exceeded", retry_after=MAX_RETRY_AFTER_S,
                headers=NO_RETRY,
            )

    def _refuse_over_rate(self, tenant: TenantState, need: Demand) -> None:
        for bucket, n, what in ((tenant.rpm, 1, "requests"), (tenant.tpm, need.tokens, "tokens")):
            wait = bucket.wait_for(n) if bucket is not None else 0.0
            if wait > 0:
                raise RateLimited(
                    f"Rate limit reached for {what} per minute; retry in {math.ceil(wait)} s.",
                    retry_after=max(1.0, wait),
                )

    # ---- the queue ------------------------------------------------------------------------

    async def _wait(self, waiter: Waiter) -> Reservation:
        fut = waiter.future
        if fut.done():
            return fut.result()
        timeout = self.cfg.queue_timeout_s
        if waiter.ctx.deadline is not None:
            timeout = min(timeout, waiter.ctx.deadline - time.time())
        if len(self._waiters) > self.cfg.max_queue or timeout <= 0:
            raise self._give_up(waiter)
        try:
            await asyncio.wait({fut}, timeout=timeout)
        except BaseException:  # cancelled (client gone): release or leave the queue
            self._abandon(waiter)
            raise
        if fut.done():
            return fut.result()
        raise self._give_up(waiter)

    def _key(self, w: Waiter) -> tuple[int, int, int, int]:
        """Priority first; among equals, the tenant holding fewer bytes now, then FIFO."""
        pool = self.reservations.pools[w.ctx.backend]
        return (w.rank, pool.tenant_bytes(w.tenant.cfg.name), w.tenant.active, w.seq)

    def _tenant_fits(self, ctx: RequestContext, tenant: TenantState, need: Demand) -> bool:
        """Within the tenant's max_concurrency and KV share (the backend's pool aside)."""
        limit = tenant.cfg.limits.max_concurrency
        if limit is not None and tenant.active >= limit:
            return False
        cap = tenant.share_cap(need.budget)
        pool = self.reservations.pools[ctx.backend]
        return cap is None or pool.tenant_bytes(tenant.cfg.name) + need.kv_bytes <= cap

    def _dispatch(self) -> None:
        """Grant waiters in order while they fit; the first that does not fit its backend
        blocks the ones behind it there (no starving large requests by backfilling)."""
        granted = True
        while granted:
            granted = False
            blocked: set[str] = set()
            for w in sorted(self._waiters, key=self._key):
                if w.ctx.backend in blocked:
                    continue
                if not self._tenant_fits(w.ctx, w.tenant, w.need):
                    w.held_by = "tenant"
                    continue
                if not self.reservations.pools[w.ctx.backend].fits(w.need.kv_bytes):
                    w.held_by = "capacity"
                    blocked.add(w.ctx.backend)
                    continue
                self._grant(w)
                granted = True
                break

    def _reserve(self, ctx: RequestContext, tenant: TenantState, need: Demand) -> Reservation:
        res = Reservation(ctx.backend, tenant.cfg.name, need.kv_bytes, need.tokens, ctx.adapter,
                          need.adapter_bytes)
        self.reservations.reserve(res)
        tenant.active += 1
        return res

    def _grant(self, w: Waiter) -> None:
        res = self._reserve(w.ctx, w.tenant, w.need)
        self._leave_queue(w)
        w.future.set_result(res)

    def _leave_queue(self, w: Waiter) -> None:
        self._waiters.remove(w)
        self.reservations.pools[w.ctx.backend].queued -= w.need.kv_bytes

    def _release(self, res: Reservation) -> None:
        self.reservations.release(res)
        self._tenants[res.tenant].active -= 1
        self._dispatch()

    def _abandon(self, w: Waiter) -> None:
        if w.future.done() and not w.future.cancelled():
            self._release(w.future.result())  # granted just as the client left
            return
        if w in self._waiters:
            self._leave_queue(w)
            w.future.cancel()
            if w.tenant.tpm is not None:
                w.tenant.tpm.give_back(w.need.tokens)
            self._dispatch()

    def _give_up(self, w: Waiter) -> GatewayError:
        self._abandon(w)
        wait = self.reservations.wait_estimate(w.ctx.backend, w.need.kv_bytes)
        retry = min(MAX_RETRY_AFTER_S, max(1.0, wait if wait is not None else self.cfg.queue_timeout_s))
        if w.held_by == "tenant":
            return RateLimited(
                "Your concurrency or KV share limit is in use by your other requests; "
                f"retry in {math.ceil(retry)} s.", code="tenant_capacity_exceeded",
                retry_after=retry,
            )
        return Unavailable(
            f"The model is at its memory capacity; retry in {math.ceil(retry)} s.",
            code="capacity_exceeded", retry_after=retry,
        )
