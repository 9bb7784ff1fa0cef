"""degrade: send a request to its model's smaller `degrade_to` tier when the tier asked for
cannot admit it soon.

"Cannot admit soon": the KV bytes already reserved exceed high_watermark of the budget, or the
request does not fit now and the estimated wait (bytes short / observed drain rate; unknown
counts as too long) exceeds wait_threshold_s. Then a tenant with allow_degrade is served by
the degrade_to model, with its own adapter for that model if it has one, else the base
model; a tenant without allow_degrade gets 503 with Retry-After. The response's `model`
names the model that answered; header x-gateway-degraded-from names the one asked for.
"""

from __future__ import annotations

import math

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import Unavailable
from policies.base import Outcome, PolicyEnv, modified, passed
from policies.demand import demand

MAX_RETRY_AFTER_S = 60.0


class Degrade:
    name = "degrade"

    def __init__(self, env: PolicyEnv) -> None:
        self.env = env
        self.cfg = env.settings.policy_options.degrade

    async def apply(self, ctx: RequestContext) -> Decision:
        settings = self.env.settings
        model = settings.model(ctx.target_model)
        smaller = settings.model(model.degrade_to) if model and model.degrade_to else None
        if smaller is None:
            return passed(self.name, "no smaller tier")
        need = demand(self.env.backend(ctx), ctx)
        if need.budget is None or need.budget <= 0:
            return passed(self.name, "tier reports no capacity")
        pool = self.env.ledger.pool(ctx.backend, need.budget)
        pressure = pool.reserved / need.budget
        wait = self.env.ledger.wait_estimate(ctx.backend, need.kv_bytes)
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

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        if self.env.router is not None:
            self.env.router.release(ctx)  # the replica route() counted (idempotent)
