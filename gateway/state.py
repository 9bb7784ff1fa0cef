"""What one app holds: the settings, tenants, backends, policy chain, telemetry, drain.

A config reload (gateway/reload.py) builds a new GatewayState and swaps it in; a request keeps
the state it started under to its end (`active` counts them), so it finishes under its config."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from gateway.core import cpu
from gateway.core.backend import Backend
from gateway.core.residency import AdapterResidency, SharesResidency
from gateway.rollout.manager import Rollouts
from gateway.settings import Settings
from gateway.shutdown import Drain
from gateway.telemetry import Telemetry
from gateway.tenants import AdminKey, TenantDirectory
from policies.chain import PolicyChain
from policies.quotas import Quotas
from policies.redis_quotas import RedisQuotas
from policies.registry import build_chain
from policies.shared_residency import SharedResidency


@dataclass
class GatewayState:
    settings: Settings
    tenants: TenantDirectory
    admin: AdminKey
    backends: dict[str, Backend]
    policies: PolicyChain  # the configured policy chain; .reservations: the bytes admission holds
    telemetry: Telemetry
    ready: bool = False
    started: float = field(default_factory=time.time)
    drain: Drain = field(default_factory=lambda: Drain(10.0))  # graceful shutdown
    metrics_key: AdminKey | None = None  # set: /metrics needs this bearer key
    # -- operations: config reload
    version: str = ""  # the config's version: a hash of the file and the keys it names
    loaded_at: float = field(default_factory=time.time)
    active: int = 0  # generation requests in flight that started under this state
    # -- scale-out: adapters on servers every process shares, decided fleet-wide
    residency: AdapterResidency | None = None
    # -- rollouts: one for the app's life, re-configured by every reload
    rollouts: Rollouts | None = None


def config_version(settings: Settings, tenants: TenantDirectory) -> str:
    """The config's version: a hash of the file's bytes (or, for settings built in memory,
    of their value) and of which key digests each tenant has (keys files, environment)."""
    h = hashlib.sha256((settings.digest or repr(settings)).encode())
    h.update(tenants.fingerprint())
    return h.hexdigest()[:16]


def build_state(settings: Settings, backends: dict[str, Backend], telemetry: Telemetry,
                drain: Drain, previous: GatewayState | None = None,
                tenants: TenantDirectory | None = None,
                quotas: Quotas | None = None,
                rollouts: Rollouts | None = None) -> GatewayState:
    """The state `settings` describe, over running `backends`. `previous` (a reload): the
    state it replaces, whose policies hand over their live state (reservations, the
    admission queue and quotas, replica counts, the shared state). `tenants`: the keys
    already read. `quotas`: shared_state's client, at start (a reload keeps the previous)."""
    tenants = tenants if tenants is not None else TenantDirectory(settings.tenants)
    server = settings.server
    cpu.configure(server.cpu_workers)  # the process's tenant-fair CPU pool (start and reload)
    state = GatewayState(
        settings=settings,
        tenants=tenants,
        admin=AdminKey(server.admin_api_key_env),
        backends=backends,
        policies=build_chain(settings.policies, settings.policy_options, settings.models,
                             settings.tenants, backends, quotas=quotas,
                             previous=previous.policies if previous is not None else None),
        telemetry=telemetry,
        drain=drain,
        metrics_key=AdminKey(server.metrics_api_key_env) if server.metrics_api_key_env else None,
        version=config_version(settings, tenants),
    )
    if previous is not None:
        state.started = previous.started
        state.residency = previous.residency
        rollouts = rollouts if rollouts is not None else previous.rollouts
    elif isinstance(state.policies.quotas, RedisQuotas):
        state.residency = SharedResidency(state.policies.quotas)
    if rollouts is not None:  # the rollouts this config names (a reload keeps live stages)
        rollouts.configure(settings, backends)
        state.rollouts = rollouts
    if state.residency is not None:  # every backend that loads adapters on a shared server
        for backend in backends.values():
            if isinstance(backend, SharesResidency):
                backend.share_residency(state.residency)
    telemetry.attach_policies(state.policies)
    return state
