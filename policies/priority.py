"""Request priority: `x-gateway-priority: low | normal | high` lowers a request's class below its
tenant's (never raises it), and `shed_low` turns a tenant's `low` requests away at saturation.

- No header: the tenant's class (`tenants[].priority`).
- A class at or below the tenant's: the request's class (admission's queue order, the engine's
  preemption order read ctx.priority).
- A class above the tenant's, or a value that is none of the three: 400.
- `shed_low: true`: a `low` request of that tenant that would wait in the admission queue
  (no KV or concurrency room now) is refused at once, 429 with Retry-After, instead of
  queueing (policies/admission.py asks `sheds`).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.core.config import PRIORITY_RANK, TenantConfig
from gateway.core.errors import InvalidRequest, RateLimited

HEADER = "x-gateway-priority"
SHED_RETRY_AFTER_S = 1.0  # what a shed request is told: capacity frees as requests finish


def from_headers(tenant: TenantConfig, headers: Sequence[tuple[bytes, bytes]]) -> str:
    """request_priority from a request's raw headers (lower-case names)."""
    for name, value in headers:
        if name == b"x-gateway-priority":
            return request_priority(tenant, value.decode("latin-1"))
    return tenant.priority


def request_priority(tenant: TenantConfig, header: str | None) -> str:
    """The class a request runs at: the tenant's, or the lower one its header names."""
    if header is None:
        return tenant.priority
    asked = header.strip().lower()
    if asked not in PRIORITY_RANK:
        raise InvalidRequest(
            f"{HEADER} must be one of low, normal or high.", param=HEADER, code="invalid_priority"
        )
    if PRIORITY_RANK[asked] < PRIORITY_RANK[tenant.priority]:
        raise InvalidRequest(
            f"{HEADER} is {asked!r}, above your account's class ({tenant.priority!r}); a "
            "request may only lower its class.",
            param=HEADER,
            code="priority_not_allowed",
        )
    return asked


def sheds(tenant: TenantConfig, priority: str) -> bool:
    """This request is refused rather than queued when admission would queue it."""
    return tenant.shed_low and priority == "low"


def shed(retry_after: float | None = None) -> RateLimited:
    retry = max(SHED_RETRY_AFTER_S, retry_after or 0.0)
    return RateLimited(
        "The model is busy and this request is low priority; it was not queued. Retry later.",
        code="low_priority_shed",
        retry_after=retry,
    )
