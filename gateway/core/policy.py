"""The Policy interface, and Fallback: what a policy may add to take over a failed attempt.

A policy looks at a RequestContext before dispatch and passes, modifies it, or rejects it by
raising a GatewayError (the status and OpenAI error the client gets). `on_finish` runs for
every policy of the chain once the attempt is over, whatever the outcome, so nothing a policy
holds stays held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import BackendError

# "retried": the attempt failed before its first byte and the request goes on elsewhere.
Outcome = Literal["ok", "error", "rejected", "cancelled", "retried"]


class Policy(Protocol):
    name: str

    async def apply(self, ctx: RequestContext) -> Decision:
        """Pass, modify ctx, or raise a GatewayError to reject (which stops the chain)."""

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Always called once the attempt is over; releases whatever apply took."""


@runtime_checkable
class Fallback(Protocol):
    """A policy that can take over an attempt whose backend failed before its first byte."""

    async def on_backend_error(self, ctx: RequestContext, error: BackendError) -> Decision:
        """"modify": ctx now names another target (replica or tier) and the chain runs again
        on it; "pass": not this policy's to retry (the next Fallback is asked, else the error
        stands). Called after the failed attempt's on_finish("retried") released its holds."""


@runtime_checkable
class Gate(Protocol):
    """A policy with a cheap check that runs before any policy's expensive work (counting,
    trimming, grammars): the chain calls every gate, in order, before the first apply."""

    name: str

    async def gate(self, ctx: RequestContext) -> None:
        """Raise a GatewayError to refuse; whatever it takes, on_finish gives back."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a policy that has none (its `Config`)."""


def passed(policy: str, reason: str = "") -> Decision:
    return Decision(policy=policy, action="pass", reason=reason)


def modified(policy: str, reason: str) -> Decision:
    return Decision(policy=policy, action="modify", reason=reason)
