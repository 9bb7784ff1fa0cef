"""Policy names (as configured under `policies:`) -> classes, and building the chain."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings
from policies.adapter_selection import AdapterSelection
from policies.admission import Admission
from policies.base import PolicyChain, PolicyEnv
from policies.context_trim import ContextTrim
from policies.degrade import Degrade
from policies.ledger import Ledger
from policies.routing import Routing

if TYPE_CHECKING:
    from gateway.core.backend import Backend

POLICY_KINDS: dict[str, Any] = {
    "adapter_selection": AdapterSelection,
    "routing": Routing,
    "context_trim": ContextTrim,
    "degrade": Degrade,
    "admission": Admission,
}


def build_chain(
    settings: Settings, backends: dict[str, Backend], clock: Callable[[], float] = time.monotonic
) -> PolicyChain:
    """One instance of each configured policy, in the configured order, sharing one ledger."""
    ledger = Ledger(clock, settings.policy_options.admission.drain_window_s)
    env = PolicyEnv(settings, backends, ledger, clock)
    unknown = [n for n in settings.policies if n not in POLICY_KINDS]
    if unknown:
        raise KeyError(f"unknown policies {unknown} (known: {', '.join(sorted(POLICY_KINDS))})")
    return PolicyChain([POLICY_KINDS[name](env) for name in settings.policies], ledger)
