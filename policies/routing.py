"""routing: the policy that sends each request to one replica of its tier.

The choice itself (adapter affinity, load, rotation) is policies/replicas.py's Router, shared
through PolicyEnv.router so that degrade routes the same way when it switches tiers. In the
default chain routing runs right after adapter_selection, so context_trim, degrade and
admission see the chosen replica (its tokenizer, its KV pool in the ledger).
"""

from __future__ import annotations

from gateway.core.context import Decision, RequestContext
from policies.base import Outcome, PolicyEnv, modified, passed


class Routing:
    name = "routing"

    def __init__(self, env: PolicyEnv) -> None:
        self.env = env

    async def apply(self, ctx: RequestContext) -> Decision:
        choice = self.env.route(ctx, ctx.target_model)
        model = self.env.settings.model(ctx.target_model)
        if model is None or len(model.backends) == 1:
            return passed(self.name, "one replica")
        return modified(self.name, f"replica {choice}")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        if self.env.router is not None:
            self.env.router.release(ctx)
