"""Policy names (as configured under `policies:`) -> classes, and building the chain."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from gateway.core.backend import Backend
from gateway.core.config import ModelConfig, TenantConfig
from policies.adapter_selection import AdapterSelection
from policies.admission import Admission
from policies.chain import CarriesOver, PolicyChain, PolicyEnv, PolicyKind
from policies.context_trim import ContextTrim
from policies.degrade import Degrade
from policies.quotas import Quotas
from policies.redis_quotas import RedisQuotas
from policies.reservations import Reservations
from policies.routing import Router, Routing

POLICY_KINDS: dict[str, PolicyKind] = {
    "adapter_selection": AdapterSelection,
    "routing": Routing,
    "context_trim": ContextTrim,
    "degrade": Degrade,
    "admission": Admission,
}

DEFAULT_POLICIES = ("adapter_selection", "routing", "context_trim", "degrade", "admission")


def build_chain(
    names: Sequence[str], options: Mapping[str, object], models: Sequence[ModelConfig],
    tenants: Sequence[TenantConfig], backends: Mapping[str, Backend],
    clock: Callable[[], float] = time.monotonic, quotas: Quotas | None = None,
    previous: PolicyChain | None = None,
) -> PolicyChain:
    """One instance of each named policy, in order, with its options (`options[name]`, else
    its Config's defaults), sharing one env: reservations, router, clock, and `quotas`
    (policies/redis_quotas.py's RedisQuotas with shared_state configured; else in-process).

    `previous` (a config reload): the chain it replaces, whose reservations, router and
    quotas the new chain shares and whose policies hand their live state over (CarriesOver)."""
    unknown = [n for n in names if n not in POLICY_KINDS]
    if unknown:
        raise KeyError(f"unknown policies {unknown} (known: {', '.join(sorted(POLICY_KINDS))})")
    if previous is not None:
        reservations, router = previous.reservations, previous.router
        quotas = quotas if quotas is not None else previous.quotas
    else:
        reservations, router = Reservations(clock), Router()
        if isinstance(quotas, RedisQuotas):  # replica affinity shared with the other processes
            router.publish = quotas.publish_affinity
            quotas.on_affinity = router.merge_affinity
    env = PolicyEnv(models={m.name: m for m in models}, tenants={t.name: t for t in tenants},
                    backends=backends, reservations=reservations, router=router, clock=clock,
                    quotas=quotas)
    policies = []
    for name in names:
        kind = POLICY_KINDS[name]
        policy = kind(env, options.get(name) or kind.Config())
        old = previous.get(name) if previous is not None else None
        if old is not None and isinstance(policy, CarriesOver):
            policy.carry_over(old)
        policies.append(policy)
    return PolicyChain(policies, reservations, router, quotas)
