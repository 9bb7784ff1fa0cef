"""adapter_selection: which LoRA adapter serves this request.

Default: the tenant's adapter for the model (tenant.adapters). A request may ask for another
with `model: "demo:acme-legal"`; it is served only if the tenant lists it under
allowed_adapters for that model (its default adapter is always allowed). An adapter the
backend does not know is 404 adapter_not_found; one it knows that this tenant may not use
(another tenant's) is 403 adapter_not_allowed. Response header: x-gateway-adapter.
"""

from __future__ import annotations

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import NotFound, PermissionDenied
from gateway.core.policy import NoOptions, Outcome, modified, passed
from policies.chain import PolicyEnv


class AdapterSelection:
    name = "adapter_selection"
    Config = NoOptions

    def __init__(self, env: PolicyEnv, cfg: NoOptions) -> None:
        self.env = env

    async def apply(self, ctx: RequestContext) -> Decision:
        tenant = self.env.tenant(ctx)
        default = tenant.adapters.get(ctx.target_model)
        asked = ctx.requested_adapter
        if asked is None or asked == default:
            ctx.adapter = default
            return modified(self.name, f"tenant adapter {default}") if default else passed(self.name)
        known = self.env.backend(ctx).adapters()
        if known is not None and asked not in known:
            raise NotFound(
                f"The adapter '{asked}' does not exist for model '{ctx.target_model}'.",
                param="model", code="adapter_not_found",
            )
        if asked not in tenant.allowed_adapters.get(ctx.target_model, ()):
            raise PermissionDenied(
                f"You may not use the adapter '{asked}' with model '{ctx.target_model}'.",
                param="model", code="adapter_not_allowed",
            )
        ctx.adapter = asked
        return modified(self.name, f"requested adapter {asked}")

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        return None
