"""admission: reserve a request's KV bytes before dispatch, or queue it, or refuse it.

Order of checks, each with the status a client can act on:
  (gate, before every policy's apply, for a request over 16 KiB) requests per minute and a
  provisional token charge of its body's bytes: 429 before anything counted its prompt
  never fits the backend's whole KV budget             -> 400 context_length_exceeded
  never fits the tenant's share / tokens per minute    -> 429, x-should-retry: false
  its spend budget's worst case does not fit            -> 429 budget_exceeded (policies/budget.py)
  requests or tokens per minute spent                  -> 429, Retry-After = bucket refill
  a `low` request of a shed_low tenant that would queue -> 429 low_priority_shed
  otherwise wait in the queue (the request's priority, then the tenant served the fewest
  weighted tokens: policies/fair_share.py, then FIFO) until the bytes fit the budget and the
  tenant's concurrency and KV share; past the queue timeout or the deadline: 429 if the
  tenant's own limits held it, else 503, both with a Retry-After from the observed drain rate.

The sum of reservations on a backend never exceeds its budget (Reservations.reserve refuses).

Tokens per minute follow DESIGN's one rule: prompt + the expected output (policies/estimate.py,
the limit until enough answers were seen) is charged at admission and settled to the answer's
usage at the end. Rate buckets and leases live in env.quotas: this process (LocalQuotas), or
Redis for every gateway process (policies/redis_quotas.py). With shared quotas a request
admitted here also takes a lease, fleet-wide, on its tenant's max_concurrency and, on a
backend every process shares (Capacity.shared: vLLM), on its KV budget and the tenant's
share of it; it waits for the lease (re-trying when a lease is released, or on a short
back-off for other processes' releases) within the same queue timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from gateway.core import cpu
from gateway.core.backend import Capacity
from gateway.core.config import PRIORITY_RANK, TenantConfig, degrade_chain
from gateway.core.context import Decision, RequestContext, Reservation, Usage
from gateway.core.errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    RateLimited,
    Unavailable,
)
from gateway.core.policy import Outcome, Policy, passed
from policies import priority
from policies.budget import Budgets, Charge, cost_nanos
from policies.chain import PolicyEnv
from policies.demand import Demand, demand, estimate_key
from policies.fair_share import FairShare
from policies.leases import Bucket, Scope
from policies.quotas import LocalQuotas, Quotas
from policies.redis_quotas import RedisQuotas

NO_RETRY = {"x-should-retry": "false"}
MAX_RETRY_AFTER_S = 60.0
LEASE_RETRY_S = (0.01, 0.2)  # back-off between lease attempts while another process holds it


@dataclass(frozen=True)
class AdmissionConfig:
    queue_timeout_s: float = 10.0  # longest wait in the admission queue
    max_queue: int = 1024  # waiting requests beyond this are refused at once
    drain_window_s: float = 30.0  # how far back the drain rate (for Retry-After) looks

    def __post_init__(self) -> None:
        if self.queue_timeout_s < 0 or self.max_queue < 0 or self.drain_window_s <= 0:
            raise ValueError("queue_timeout_s and max_queue must be >= 0, drain_window_s > 0")


class TenantState:
    """A tenant's requests admitted now in this process (its rate buckets are env.quotas')."""

    def __init__(self, cfg: TenantConfig) -> None:
        self.cfg = cfg
        self.active = 0

    def buckets(self, requests: float, tokens: float) -> list[Bucket]:
        """The tenant's rate buckets that apply, with what to take (or give back) of each."""
        limits, name = self.cfg.limits, self.cfg.name
        out = []
        if limits.requests_per_minute and requests:
            out.append(Bucket(f"rate:{name}:requests", limits.requests_per_minute, requests))
        if limits.tokens_per_minute and tokens:
            out.append(Bucket(f"rate:{name}:tokens", limits.tokens_per_minute, tokens))
        return out

    def reconfigure(self, cfg: TenantConfig) -> None:
        """A config reload: the new limits apply (the buckets in quotas keep what was taken,
        checked against the new limit at their next take); requests admitted stay counted."""
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
        self.quotas: Quotas = env.quotas or LocalQuotas(env.clock)
        self._tenants: dict[str, TenantState] = {}
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()
        self._leases: dict[int, tuple[str, list[Scope]]] = {}  # id(Reservation) -> lease
        shared = self.quotas if isinstance(self.quotas, RedisQuotas) else None
        self.fair = FairShare(shared)  # the queue's order within a priority
        self.budgets = Budgets(shared)  # spend budgets (limits.budget)
        self._charges: dict[int, Charge] = {}  # id(ctx) -> its budget reservation

    def carry_over(self, previous: Policy) -> None:
        """A config reload: the previous chain's admission hands over its live state (the
        tenants' requests admitted, the queue, the leases and this process's quotas), so both
        serve one queue and one count while requests admitted before the reload finish;
        limits become the new ones."""
        if not isinstance(previous, Admission):
            return
        self._tenants, self._waiters, self._seq = previous._tenants, previous._waiters, previous._seq
        self._leases, self.quotas = previous._leases, previous.quotas
        self.fair.carry_over(previous.fair)
        self.budgets.carry_over(previous.budgets)
        self._charges = previous._charges
        for name, state in self._tenants.items():
            cfg = self.env.tenants.get(name)
            if cfg is not None:
                state.reconfigure(cfg)

    # ---- for telemetry --------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # ---- the policy -----------------------------------------------------------------------

    async def gate(self, ctx: RequestContext) -> None:
        """Before any policy's expensive work on a large request (counting, trimming,
        grammars): one request and a provisional charge of its body's bytes (an upper bound of
        its prompt, capped at the limit) from the tenant's buckets, so a tenant past its limit
        gets a 429 before its prompt costs anything. `apply` settles the charge to the exact
        count. A small request (inline work, gateway/core/cpu.py) is charged once, in apply."""
        if ctx.body_bytes <= cpu.INLINE_BYTES:
            return
        tenant = self._tenant(self.env.tenant(ctx))
        budget = tenant.cfg.limits.budget
        if budget is not None and ctx.sampling.max_tokens is not None and not ctx.shadow:
            # a budget known spent: refused before the prompt is counted (no round trip)
            least = self._least_output_cost(ctx.target_model, ctx.sampling.n * ctx.sampling.max_tokens)
            self.budgets.refuse_spent(tenant.cfg.name, budget, least)
        tpm = tenant.cfg.limits.tokens_per_minute
        tokens = min(ctx.body_bytes, tpm) if tpm else 0
        buckets = tenant.buckets(1, tokens)
        if buckets:
            wait = await self.quotas.take(buckets)
            if wait > 0:
                raise _rate_limited(buckets, wait)
        ctx.precharged_tokens = tokens

    async def apply(self, ctx: RequestContext) -> Decision:
        tenant = self._tenant(self.env.tenant(ctx))
        backend = self.env.backend(ctx)
        need = await demand(backend, ctx, self.env.estimates)  # counts off the loop when large
        ctx.expected_tokens = need.expected_tokens  # what the backend's KV reservation plans for
        cap = backend.capacity()
        lanes = cap.lanes if cap is not None else None
        self.reservations.pool(ctx.backend, need.budget,  # (re)learns the budget and lanes
                               None if lanes is None or need.budget is None
                               else lanes.long_cap(need.budget))
        self._refuse_impossible(tenant, need)
        charge = await self._reserve_budget(ctx, tenant, need)
        try:
            decision = await self._admit(ctx, tenant, need, cap)
        except BaseException:  # refused or cancelled: the budget reservation goes back
            if charge is not None:
                task = asyncio.ensure_future(self.budgets.settle(charge, 0))
                task.add_done_callback(_quiet)
            raise
        if charge is not None:
            self._charges[id(ctx)] = charge
        return decision

    async def _reserve_budget(self, ctx: RequestContext, tenant: TenantState,
                              need: Demand) -> Charge | None:
        """The request's budget reservation (policies/budget.py): its prompt's cost plus its
        output estimate's, admitted only when its worst case fits beside the worst cases in
        flight. None: the tenant has no budget, or a shadow request (never charged)."""
        budget = tenant.cfg.limits.budget
        model = self.env.model(ctx.target_model)
        price = model.price if model is not None else None
        if budget is None or price is None or ctx.shadow:
            return None
        if (ctx.kind != "embeddings" and ctx.sampling.max_tokens is None
                and need.max_tokens == 0):
            raise InvalidRequest(
                "Your account has a spend budget and this model's longest answer is unknown: "
                "name max_tokens (or max_completion_tokens).", param="max_tokens",
                code="max_tokens_required")
        expected = need.max_tokens if need.expected_tokens is None else need.expected_tokens
        estimate = cost_nanos(price, need.prompt_tokens, need.sequences * expected)
        worst = cost_nanos(price, need.prompt_tokens, need.sequences * need.max_tokens)
        return await self.budgets.reserve(tenant.cfg.name, budget, estimate, worst)

    def _least_output_cost(self, model_name: str, tokens: int) -> int:
        """A lower bound of what `tokens` output tokens cost on `model_name` or any tier it
        degrades to (degrade runs after the gate), in nano-units; 0 where one is unpriced."""
        costs = []
        for model in degrade_chain(self.env.models, model_name):
            if model is None or model.price is None:
                return 0
            costs.append(cost_nanos(model.price, 0, tokens))
        return min(costs, default=0)

    async def _admit(self, ctx: RequestContext, tenant: TenantState, need: Demand,
                     cap: Capacity | None) -> Decision:
        scopes = self._scopes(ctx, tenant, need, cap)
        start = self.env.clock()
        lease, held = "", not scopes
        # what the gate took already is settled here: the rest of the charge, or a give-back
        pre = ctx.precharged_tokens
        buckets = tenant.buckets(0 if pre is not None else 1, max(0, need.tokens - (pre or 0)))
        if scopes and not self._waiters and self._fits(ctx, tenant, need):
            # with shared quotas, the rate buckets and the lease in one round trip
            lease = self.quotas.new_lease()
            wait, failed = await self.quotas.admit(buckets, lease, scopes)
            if wait > 0:
                raise _rate_limited(tenant.buckets(1, need.tokens), wait)
            held = failed < 0
        elif buckets:
            wait = await self.quotas.take(buckets)
            if wait > 0:
                raise _rate_limited(tenant.buckets(1, need.tokens), wait)
        if pre is not None:
            ctx.precharged_tokens = None
            if pre > need.tokens:
                self._give_back_tokens(tenant, pre - need.tokens)
        try:
            res = await self._local(ctx, tenant, need, start)
        except BaseException:  # refused or cancelled in the queue: the lease goes back too
            if lease and held:
                task = asyncio.ensure_future(self.quotas.release(lease, scopes))
                task.add_done_callback(_quiet)
            raise
        if held and lease:
            self._leases[id(res)] = (lease, scopes)
        elif not held:  # another process holds what it needs: wait for the lease
            await self._lease(ctx, res, scopes, start, lease or self.quotas.new_lease())
        return self._admitted(ctx, res, self.env.clock() - start if scopes else ctx.queue_seconds)

    def _fits(self, ctx: RequestContext, tenant: TenantState, need: Demand) -> bool:
        return self._tenant_fits(ctx, tenant, need) and self.reservations.pools[ctx.backend].fits(
            need.kv_bytes, need.long)

    async def _local(self, ctx: RequestContext, tenant: TenantState, need: Demand,
                     start: float) -> Reservation:
        """This process's reservation: at once when nobody is queued and it fits (the common
        case, on the hot path: what queueing then dispatching would grant, without a future
        and a queue pass), else through the queue."""
        if not self._waiters and self._fits(ctx, tenant, need):
            return self._reserve(ctx, tenant, need)
        if priority.sheds(tenant.cfg, ctx.priority):  # `low` with shed_low: never queued
            raise priority.shed(self.reservations.wait_estimate(ctx.backend, need.kv_bytes))
        rank = self._rank(ctx, tenant)
        if not any(w.tenant is tenant and w.rank == rank for w in self._waiters):
            self.fair.arrive(tenant.cfg.name,  # starts waiting: no credit banked while idle
                             [w.tenant.cfg.name for w in self._waiters if w.rank == rank])
        waiter = Waiter(ctx, tenant, need, rank, next(self._seq),
                        asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.reservations.pools[ctx.backend].queued += need.kv_bytes
        self._dispatch()
        try:
            return await self._wait(waiter)
        finally:
            ctx.queue_seconds = self.env.clock() - start

    # ---- leases on what every gateway process shares ---------------------------------------

    def _scopes(self, ctx: RequestContext, tenant: TenantState, need: Demand,
                cap: Capacity | None) -> list[Scope]:
        """With shared quotas: the tenant's concurrency, and on a backend every process
        shares (by its configured name), the tenant's share of its KV budget and the budget."""
        if not self.quotas.shared:
            return []
        limits, name = tenant.cfg.limits, tenant.cfg.name
        scopes = []
        if limits.max_concurrency is not None:
            scopes.append(Scope(f"concurrency:{name}", limits.max_concurrency, 1))
        if cap is not None and cap.shared and need.budget is not None:
            share = tenant.share_cap(need.budget)
            if share is not None:
                scopes.append(Scope(f"kv:{ctx.backend}:{name}", share, need.kv_bytes))
            scopes.append(Scope(f"kv:{ctx.backend}", need.budget, need.kv_bytes))
        return scopes

    async def _lease(self, ctx: RequestContext, res: Reservation, scopes: list[Scope],
                     start: float, lease: str) -> None:
        """Hold `scopes` for this request, waiting within the queue timeout (or deadline)."""
        timeout = self.cfg.queue_timeout_s
        if ctx.deadline is not None:
            timeout = min(timeout, ctx.deadline - time.time())
        delay = LEASE_RETRY_S[0]
        try:
            while True:
                failed = await self.quotas.acquire(lease, scopes)
                if failed < 0:
                    self._leases[id(res)] = (lease, scopes)
                    return
                if priority.sheds(self._tenants[res.tenant].cfg, ctx.priority):
                    raise priority.shed()  # another process holds the room: not queued
                left = start + timeout - self.env.clock()
                if left <= 0:
                    held_by = "capacity" if scopes[failed].key == f"kv:{ctx.backend}" else "tenant"
                    raise self._refusal(ctx.backend, res.kv_bytes, held_by)
                await self.quotas.changed(min(delay, left))
                delay = min(delay * 2, LEASE_RETRY_S[1])
        except BaseException:  # refused, cancelled, Redis refused (reject): as leaving the queue
            self._release(res)
            self._give_back_tokens(self._tenants[res.tenant], res.tokens)
            raise

    def _admitted(self, ctx: RequestContext, res: Reservation, queued_s: float) -> Decision:
        ctx.queue_seconds = queued_s
        ctx.reservation = res
        ctx.memory.kv_bytes_reserved = res.kv_bytes
        reason = f"reserved {res.kv_bytes} KV bytes"
        if res.adapter_bytes:
            reason += f" and {res.adapter_bytes} adapter bytes"
        return passed(self.name, f"{reason} after {ctx.queue_seconds * 1000:.0f} ms")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        if ctx.precharged_tokens:  # refused before admission settled it: the tokens go back
            tenant = self._tenants.get(ctx.tenant)
            if tenant is not None:
                self._give_back_tokens(tenant, ctx.precharged_tokens)
        ctx.precharged_tokens = None
        charge = self._charges.pop(id(ctx), None)
        if charge is not None:
            await self.budgets.settle(charge, self._spent(ctx, charge, outcome))
        res = ctx.reservation
        if isinstance(res, Reservation) and not res.released:
            self._release(res)
            if outcome == "ok" and ctx.usage is not None:
                self.env.estimates.observe(estimate_key(ctx), ctx.usage.completion_tokens)
            self._served(ctx, res, outcome)
            lease, scopes = self._leases.pop(id(res), ("", []))
            buckets = self._settlement(res, outcome, ctx.usage)
            if scopes or buckets:
                await self.quotas.finish(buckets, lease, scopes)

    def _spent(self, ctx: RequestContext, charge: Charge, outcome: Outcome) -> int:
        """What a budget is charged at the end: the answer's cost at the answering model's
        price (its usage record's); nothing for a failed-over attempt (the next is charged);
        the estimate where no usage came back (an error, a cancel)."""
        if outcome == "retried":
            return 0
        model = self.env.model(ctx.target_model)
        usage = ctx.usage
        if outcome == "ok" and usage is not None and model is not None and model.price is not None:
            return cost_nanos(model.price, usage.prompt_tokens, usage.completion_tokens,
                              usage.cached_tokens)
        return charge.estimate

    def _served(self, ctx: RequestContext, res: Reservation, outcome: Outcome) -> None:
        """Fair share's counter settled like the token buckets: to the usage, or given back
        for a failed-over attempt."""
        tenant = self._tenants.get(res.tenant)
        if tenant is None or ctx.shadow:
            return
        if outcome == "retried":
            self.fair.charge(res.tenant, -res.tokens, tenant.cfg.weight)
        elif outcome == "ok" and ctx.usage is not None:
            self.fair.charge(res.tenant, ctx.usage.total_tokens - res.tokens, tenant.cfg.weight)

    def _settlement(self, res: Reservation, outcome: Outcome, usage: Usage | None) -> list[Bucket]:
        """The rate buckets keep what a request used, not what it was charged: an attempt that
        failed over to another backend gives back its request and tokens (the next attempt is
        charged), a finished one is settled to its usage (the estimate's error, either way);
        one that ended without usage (an error, a cancel) keeps its charge."""
        tenant = self._tenants.get(res.tenant)
        if tenant is None:
            return []
        if outcome == "retried":
            return tenant.buckets(1, res.tokens)
        if outcome == "ok" and usage is not None:
            return tenant.buckets(0, res.tokens - usage.total_tokens)
        return []

    # ---- refusals before queueing ---------------------------------------------------------

    def _tenant(self, cfg: TenantConfig) -> TenantState:
        state = self._tenants.get(cfg.name)
        if state is None:
            state = self._tenants[cfg.name] = TenantState(cfg)
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
        tpm = tenant.cfg.limits.tokens_per_minute
        if tpm is not None and need.tokens > tpm:
            raise RateLimited(
                f"This request counts {need.tokens} tokens, more than your limit of "
                f"{tpm} tokens per minute.",
                code="tokens_per_minute_exceeded", retry_after=MAX_RETRY_AFTER_S,
                headers=NO_RETRY,
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

    def _key(self, w: Waiter) -> tuple[int, float, int]:
        """Priority first (a request's own class: a `high` one never waits behind a `low`
        one); among equals, the tenant served the fewest weighted tokens (fair share's
        virtual token counter), then FIFO."""
        return (w.rank, self.fair.counter(w.tenant.cfg.name), w.seq)

    @staticmethod
    def _rank(ctx: RequestContext, tenant: TenantState) -> int:
        """The request's class (x-gateway-priority), never above its tenant's."""
        return max(PRIORITY_RANK.get(ctx.priority, 1), PRIORITY_RANK[tenant.cfg.priority])

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
        blocks the ones behind it there (no starving large requests by backfilling), in its
        length lane only where the backend has lanes: short ones pass long ones."""
        granted = True
        while granted:
            granted = False
            blocked: set[tuple[str, bool]] = set()
            for w in sorted(self._waiters, key=self._key):
                pool = self.reservations.pools[w.ctx.backend]
                lane = (w.ctx.backend, w.need.long and pool.long_cap is not None)
                if lane in blocked or (w.ctx.backend, False) in blocked:
                    continue
                if not self._tenant_fits(w.ctx, w.tenant, w.need):
                    w.held_by = "tenant"
                    continue
                if not pool.fits(w.need.kv_bytes, w.need.long):
                    w.held_by = "capacity"
                    blocked.add(lane)
                    continue
                self._grant(w)
                granted = True
                break

    def _reserve(self, ctx: RequestContext, tenant: TenantState, need: Demand) -> Reservation:
        res = Reservation(ctx.backend, tenant.cfg.name, need.kv_bytes, need.tokens, ctx.adapter,
                          need.adapter_bytes, long=need.long)
        self.reservations.reserve(res)
        tenant.active += 1
        if not ctx.shadow:  # served now: fair share counts it (settled at the end)
            self.fair.charge(tenant.cfg.name, need.tokens, tenant.cfg.weight)
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
            self._give_back_tokens(w.tenant, w.need.tokens)
            self._dispatch()

    def _give_back_tokens(self, tenant: TenantState, tokens: int) -> None:
        """A request that left the queue gives back its tokens (in a task: no await here)."""
        buckets = tenant.buckets(0, tokens)
        if buckets:
            task = asyncio.ensure_future(self.quotas.settle(buckets))
            task.add_done_callback(_quiet)

    def _give_up(self, w: Waiter) -> GatewayError:
        self._abandon(w)
        return self._refusal(w.ctx.backend, w.need.kv_bytes, w.held_by)

    def _refusal(self, backend: str, kv_bytes: int, held_by: str) -> GatewayError:
        wait = self.reservations.wait_estimate(backend, kv_bytes)
        retry = min(MAX_RETRY_AFTER_S, max(1.0, wait if wait is not None else self.cfg.queue_timeout_s))
        if held_by == "tenant":
            return RateLimited(
                "Your concurrency or KV share limit is in use by your other requests; "
                f"retry in {math.ceil(retry)} s.", code="tenant_capacity_exceeded",
                retry_after=retry,
            )
        return Unavailable(
            f"The model is at its memory capacity; retry in {math.ceil(retry)} s.",
            code="capacity_exceeded", retry_after=retry,
        )


def _quiet(task: asyncio.Future[None]) -> None:
    """A give-back that failed leaves the charge standing; nothing else to do about it."""
    if not task.cancelled():
        task.exception()


def _rate_limited(buckets: list[Bucket], wait: float) -> RateLimited:
    what = " and ".join(b.key.rpartition(":")[2] for b in buckets)
    retry = min(MAX_RETRY_AFTER_S, max(1.0, wait))
    return RateLimited(f"Rate limit reached for {what} per minute; retry in {math.ceil(retry)} s.",
                       retry_after=retry)
