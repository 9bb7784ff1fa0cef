"""degrade: send a request to its model's smaller `degrade_to` tier when the tier asked for
cannot admit it soon.

"Cannot admit soon": the KV bytes already reserved exceed high_watermark of the budget, or the
request does not fit now and the estimated wait (bytes short / observed drain rate; unknown
counts as too long) exceeds wait_threshold_s. Then a tenant with allow_degrade is served by
the degrade_to model, with its own adapter for that model if it has one, else the base
model; a tenant without allow_degrade gets 503 with Retry-After. The response's `model`
names the model that answered; header x-gateway-degraded-from names the one asked for.

Fallback: when no replica of the tier is left for a request whose backend failed before its
first byte (routing's fallback passed), a tenant with allow_degrade is served by the
degrade_to tier instead, once per request (no chains of fallbacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import BackendError, Unavailable
from gateway.core.policy import Outcome, modified, passed
from policies.chain import PolicyEnv
from policies.demand import demand

MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class DegradeConfig:
    wait_threshold_s: float = 1.0  # degrade when the estimated admission wait is longer
    high_watermark: float = 0.95  # ... or when reserved + queued + this request > this share

    def __post_init__(self) -> None:
        if self.wait_threshold_s < 0 or not 0 < self.high_watermark <= 1:
            raise ValueError("wait_threshold_s must be >= 0 and high_watermark in (0, 1]")


class Degrade:
    name = "degrade"
    Config = DegradeConfig

    def __init__(self, env: PolicyEnv, cfg: DegradeConfig) -> None:
        self.env = env
        self.cfg = cfg

    async def apply(self, ctx: RequestContext) -> Decision:
        env = self.env
        model = env.model(ctx.target_model)
        smaller = env.model(model.degrade_to) if model and model.degrade_to else None
        if smaller is None:
            return passed(self.name, "no smaller tier")
        need = await demand(self.env.backend(ctx), ctx)
        if need.budget is None or need.budget <= 0:
            return passed(self.name, "tier reports no capacity")
        pool = self.env.reservations.pool(ctx.backend, need.budget)
        pressure = pool.reserved / need.budget
        wait = self.env.reservations.wait_estimate(ctx.backend, need.kv_bytes)
        wait_s = math.inf if wait is None else wait
        if pressure <= self.cfg.high_watermark and wait_s <= self.cfg.wait_threshold_s:
            return passed(self.name, f"pressure {pressure:.2f}, wait {wait_s:.2f} s")
        why = f"tier {ctx.target_model} at pressure {pressure:.2f}, estimated wait {wait_s:.1f} s"
        tenant = self.env.tenant(ctx)
        if not tenant.allow_degrade:
            retry = min(MAX_RETRY_AFTER_S, max(1.0, wait if wait is not None else MAX_RETRY_AFTER_S))
            raise Unavailable(
                f"The model '{ctx.target_model}' is at capacity and your account does not allow "
                f"serving a smaller model; retry in {math.ceil(retry)} s.",
                code="capacity_exceeded", retry_after=retry,
            )
        ctx.degraded_from = ctx.degraded_from or ctx.target_model
        ctx.target_model = smaller.name
        self.env.route(ctx, smaller.name)  # a replica of the smaller tier (sets ctx.backend)
        ctx.adapter = tenant.adapters.get(smaller.name)
        ctx.prompt_tokens = None  # the smaller tier counts with its own tokenizer
        return modified(self.name, f"{why}: served by {smaller.name}")

    async def on_backend_error(self, ctx: RequestContext, error: BackendError) -> Decision:
        """The smaller tier, once, for a tenant that allows degrading."""
        model = self.env.model(ctx.target_model)
        if error.status < 500 or model is None or model.degrade_to is None:
            return passed(self.name, "no smaller tier")
        if not self.env.tenant(ctx).allow_degrade or ctx.fell_back_to_tier:
            return passed(self.name, "not degraded")
        smaller = self.env.model(model.degrade_to)
        if smaller is None:
            return passed(self.name, "no smaller tier")
        ctx.fell_back_to_tier = True
        ctx.degraded_from = ctx.degraded_from or ctx.target_model
        ctx.target_model = smaller.name
        ctx.backend = smaller.backends[0]  # routing, when configured, re-picks a replica
        ctx.requested_adapter = None  # the tenant's own adapter for that tier, if any
        ctx.adapter = None
        ctx.prompt_tokens = None  # the tier counts with its own tokenizer
        return modified(self.name, f"degraded: served by {smaller.name}")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.env.router.release(ctx)  # the replica route() counted (idempotent)
