"""The Policy interface, what every policy is built from, and the chain that runs them.

A policy looks at a RequestContext before dispatch and passes, modifies it, or rejects it by
raising one of gateway.errors' GatewayError subclasses (the status and OpenAI error the client
gets). `on_finish` runs for every policy of the chain once the request is over, whatever the
outcome (success, error, rejection, client gone), so nothing a policy holds stays held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import GatewayError
from gateway.settings import Settings, TenantConfig
from policies.ledger import Ledger
from policies.replicas import Router

if TYPE_CHECKING:
    from gateway.core.backend import Backend

log = logging.getLogger("gateway.policies")

# "retried": the attempt failed before its first byte and the request goes on elsewhere.
Outcome = Literal["ok", "error", "rejected", "cancelled", "retried"]


class Policy(Protocol):
    name: str

    async def apply(self, ctx: RequestContext) -> Decision:
        """Pass, modify ctx, or raise a GatewayError to reject (which stops the chain)."""

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Always called once the request is over; releases whatever apply took."""


@dataclass
class PolicyEnv:
    """What every policy is built from: config, backends, the shared ledger, a clock."""

    settings: Settings
    backends: dict[str, Backend]
    ledger: Ledger
    clock: Callable[[], float] = time.monotonic
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    router: Router | None = None  # replicas: which one serves a request (policies/replicas.py)

    def __post_init__(self) -> None:
        if not self.tenants:
            self.tenants = {t.name: t for t in self.settings.tenants}
        if self.router is None:
            self.router = Router(self.settings.policy_options.routing)

    def route(self, ctx: RequestContext, model_name: str) -> str:
        """Send ctx to a replica of `model_name` (sets ctx.backend); see policies/replicas."""
        model = self.settings.model(model_name)
        if model is None or self.router is None:
            raise GatewayError(f"No model named {model_name!r} is configured.")
        return self.router.route(ctx, model, self.backends)

    def tenant(self, ctx: RequestContext) -> TenantConfig:
        try:
            return self.tenants[ctx.tenant]
        except KeyError:
            raise GatewayError(f"no tenant named {ctx.tenant!r} is configured") from None

    def backend(self, ctx: RequestContext) -> Backend:
        try:
            return self.backends[ctx.backend]
        except KeyError:
            raise GatewayError(f"No backend named {ctx.backend!r} is configured.") from None


def passed(policy: str, reason: str = "") -> Decision:
    return Decision(policy=policy, action="pass", reason=reason)


def modified(policy: str, reason: str) -> Decision:
    return Decision(policy=policy, action="modify", reason=reason)


class PolicyChain:
    """The configured policies, in order. `ledger` exposes reservations to telemetry."""

    def __init__(self, policies: Sequence[Policy], ledger: Ledger) -> None:
        self.policies = tuple(policies)
        self.ledger = ledger

    def get(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    async def apply(self, ctx: RequestContext) -> None:
        """Run every policy in order; a rejection is recorded on ctx.decisions and raised."""
        for policy in self.policies:
            try:
                decision = await policy.apply(ctx)
            except GatewayError as exc:
                ctx.decisions.append(
                    Decision(policy=policy.name, action="reject", reason=exc.message,
                             status=exc.status))
                raise
            if decision.action == "reject":  # a policy may also return its rejection
                ctx.decisions.append(decision)
                raise GatewayError(decision.reason, status=decision.status)
            ctx.decisions.append(decision)

    async def finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """on_finish of every policy, newest first; one failing never skips the others."""
        for policy in reversed(self.policies):
            try:
                await policy.on_finish(ctx, outcome)
            except Exception:
                log.exception("policy %s on_finish failed for %s", policy.name, ctx.request_id)
