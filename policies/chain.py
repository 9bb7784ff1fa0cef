"""What every policy is built from (PolicyEnv), what a policy class is (PolicyKind), and the
chain that runs them in the configured order.

The Policy and Fallback protocols themselves are gateway/core/policy.py's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.core.backend import Backend
from gateway.core.config import ModelConfig, TenantConfig
from gateway.core.context import Decision, RequestContext
from gateway.core.errors import BackendError, GatewayError
from gateway.core.policy import Fallback, Gate, Outcome, Policy
from policies.estimate import Estimates
from policies.quotas import Quotas
from policies.reservations import Reservations
from policies.routing import Router

log = logging.getLogger("gateway.policies")

FALLBACK = "fallback"  # the Decision.policy that records a failover (metrics count it)


@dataclass
class PolicyEnv:
    """What every policy of one chain shares: the tiers and tenants, the backends, the
    bytes reserved on them, the replica router, a clock; where rate buckets and leases are
    kept (None: in this process), and the completion-length estimates."""

    models: Mapping[str, ModelConfig]
    tenants: Mapping[str, TenantConfig]
    backends: Mapping[str, Backend]
    reservations: Reservations
    router: Router
    clock: Callable[[], float] = time.monotonic
    quotas: Quotas | None = None
    estimates: Estimates = field(default_factory=Estimates)

    def model(self, name: str) -> ModelConfig | None:
        return self.models.get(name)

    def route(self, ctx: RequestContext, model_name: str) -> str:
        """Send ctx to a replica of `model_name` (sets ctx.backend); see policies/routing."""
        model = self.models.get(model_name)
        if model is None:
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


class PolicyKind(Protocol):
    """A policy class: `Kind(env, Kind.Config(...))`, its options validated from
    `policy_options.<name>` (NoOptions for a policy without any)."""

    Config: type[Any]

    def __call__(self, env: PolicyEnv, cfg: Any) -> Policy: ...


@runtime_checkable
class CarriesOver(Protocol):
    """A policy with live state (quotas, a queue) that a config reload hands to the policy of
    the same name in the new chain, so that a reload neither forgets nor doubles it."""

    def carry_over(self, previous: Policy) -> None: ...


class PolicyChain:
    """The configured policies, in order. `reservations` exposes the bytes held to telemetry;
    `router` the replica counts (both carried into the chain a config reload builds);
    `quotas` is shared_state's, when configured (telemetry reads its stats)."""

    def __init__(self, policies: Sequence[Policy], reservations: Reservations,
                 router: Router | None = None, quotas: Quotas | None = None) -> None:
        self.policies = tuple(policies)
        self.reservations = reservations
        self.router = router if router is not None else Router()
        self.quotas = quotas
        # the policies that can take over a failed attempt, in chain order
        self.fallbacks: tuple[Fallback, ...] = tuple(p for p in policies if isinstance(p, Fallback))
        self.gates: tuple[Gate, ...] = tuple(p for p in policies if isinstance(p, Gate))

    def get(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    async def apply(self, ctx: RequestContext) -> None:
        """Every policy's cheap gate first (DESIGN: limits before expensive work), then
        every policy in order; a rejection is recorded on ctx.decisions and raised."""
        for gate in self.gates:
            with _recorded(ctx, gate.name):
                await gate.gate(ctx)
        for policy in self.policies:
            with _recorded(ctx, policy.name):
                decision = await policy.apply(ctx)
            if decision.action == "reject":  # a policy may also return its rejection
                ctx.decisions.append(decision)
                raise GatewayError(decision.reason, status=decision.status)
            ctx.decisions.append(decision)

    async def fall_back(self, ctx: RequestContext, error: BackendError) -> bool:
        """The attempt's backend failed before its first byte: the first Fallback policy that
        takes the request over points ctx at its new target (recorded as a "fallback"
        decision); the caller releases the attempt and runs the chain again. False: none did."""
        for policy in self.fallbacks:
            decision = await policy.on_backend_error(ctx, error)
            if decision.action == "modify":
                ctx.decisions.append(Decision(
                    policy=FALLBACK, action="modify", status=error.status,
                    reason=f"{decision.reason} (backend {ctx.failed_backends[-1]} failed "
                           f"before the first byte: {error.code})"))
                log.warning("request %s: backend %s failed (%s); %s", ctx.request_id,
                            ctx.failed_backends[-1], error.message, decision.reason)
                return True
        return False

    async def finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """on_finish of every policy, newest first; one failing never skips the others."""
        for policy in reversed(self.policies):
            try:
                await policy.on_finish(ctx, outcome)
            except Exception:
                log.exception("policy %s on_finish failed for %s", policy.name, ctx.request_id)


@contextlib.contextmanager
def _recorded(ctx: RequestContext, policy: str) -> Iterator[None]:
    """A GatewayError raised in the block is recorded on ctx.decisions as `policy`'s reject."""
    try:
        yield
    except GatewayError as exc:
        ctx.decisions.append(Decision(policy=policy, action="reject", reason=exc.message,
                                      status=exc.status))
        raise
