"""What one app holds: the settings, tenants, backends, policy chain, telemetry, drain."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.core.backend import Backend
from gateway.settings import Settings
from gateway.shutdown import Drain
from gateway.telemetry import Telemetry
from gateway.tenants import AdminKey, TenantDirectory
from policies.base import PolicyChain


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
    drain: Drain = field(default_factory=lambda: Drain(10.0))  # graceful shutdown (issue #8)
    metrics_key: AdminKey | None = None  # set: /metrics needs this bearer key
