"""degrade: to the smaller tier under pressure when allowed, 503 when forbidden."""

from __future__ import annotations

import pytest

from gateway.core.context import Reservation
from gateway.core.errors import Unavailable
from policies.degrade import Degrade
from tests.policies.fakes import ctx, make, settings

BLOCK = 16 * 2048


def policy(watermark: float = 0.95) -> Degrade:
    s = settings([{"name": "acme", "adapters": {"tiny": "acme-small"}},
                  {"name": "globex", "allow_degrade": False}],
                 policy_options={"degrade": {"high_watermark": watermark, "wait_threshold_s": 1}})
    return make(Degrade, s)


def fill(p: Degrade, blocks: int) -> None:
    p.env.reservations.pool("big", 64 * BLOCK)
    p.env.reservations.reserve(Reservation("big", "other", blocks * BLOCK))


async def test_passes_when_the_tier_has_room() -> None:
    p = policy()
    fill(p, 32)
    c = ctx()
    assert (await p.apply(c)).action == "pass" and c.target_model == "large"


async def test_degrades_when_full_with_the_tenants_small_adapter() -> None:
    p = policy()
    fill(p, 63)  # 1 block left, the request needs 2, nothing drained yet: wait unknown
    c = ctx()
    c.adapter = "acme-big"
    c.prompt_tokens = 12
    d = await p.apply(c)
    assert d.action == "modify"
    assert (c.target_model, c.backend, c.degraded_from) == ("tiny", "small", "large")
    assert c.adapter == "acme-small" and c.prompt_tokens is None


async def test_degrades_above_the_watermark_even_with_room() -> None:
    p = policy(watermark=0.5)
    fill(p, 40)
    c = ctx()
    await p.apply(c)
    assert c.degraded_from == "large"


async def test_forbidding_tenant_gets_503_and_no_degrade_to_passes() -> None:
    p = policy()
    fill(p, 63)
    with pytest.raises(Unavailable) as info:
        await p.apply(ctx(tenant="globex"))
    assert info.value.status == 503 and info.value.response_headers()["retry-after"]
    c = ctx(model="tiny")
    assert (await p.apply(c)).action == "pass"
