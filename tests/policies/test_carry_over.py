"""A config reload builds a new policy chain from the old one (build_chain(previous=...)):
the bytes reserved, the admission queue, the tenants' quotas and requests admitted and the
replica counts carry over, and the new limits apply. Requests admitted by the old chain
finish on it and free their bytes for the new chain's waiters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.core.errors import RateLimited
from gateway.settings import Settings
from policies.chain import PolicyChain
from policies.registry import build_chain
from tests.policies.fakes import FakeBackend, FakeClock, ctx, settings

BLOCK = 16 * 2048  # the fake backend's block in bytes
POLICIES = ["adapter_selection", "routing", "admission"]


def chain(s: Settings, backends: dict[str, Any], clock: FakeClock,
          previous: PolicyChain | None = None) -> PolicyChain:
    return build_chain(s.policies, s.policy_options, s.models, s.tenants, backends, clock,
                       previous=previous)


def config(limits: dict[str, Any]) -> Settings:
    return settings([{"name": "acme", "limits": limits}], policies=POLICIES,
                    policy_options={"admission": {"queue_timeout_s": 5}})


async def test_reservations_queue_and_quotas_carry_over() -> None:
    clock = FakeClock()
    backends = {"big": FakeBackend("big", 4 * BLOCK), "small": FakeBackend("small")}
    old = chain(config({"requests_per_minute": 10}), backends, clock)
    first = ctx(words=40, max_tokens=16)  # the whole budget (4 blocks)
    await old.apply(first)
    assert old.reservations.total_reserved() == 4 * BLOCK

    new = chain(config({"requests_per_minute": 3, "max_concurrency": 5}), backends, clock, old)
    assert new.reservations is old.reservations and new.router is old.router
    admission = new.get("admission")
    tenant = admission._tenants["acme"]  # type: ignore[union-attr]
    assert tenant.active == 1  # the old chain's request counts under the new limits
    assert tenant.cfg.limits.max_concurrency == 5
    book = admission.quotas.book  # type: ignore[union-attr]
    assert book.level("rate:acme:requests", 3) == pytest.approx(2)  # 1 of 3 taken

    # the new chain's request waits for the bytes the old chain's request holds ...
    second = ctx(words=10)
    waiting = asyncio.ensure_future(new.apply(second))
    await asyncio.sleep(0.01)
    assert not waiting.done() and admission.waiting == 1  # type: ignore[union-attr]
    # ... and gets them when that request finishes on the chain it started on
    await old.finish(first, "ok")
    await asyncio.wait_for(waiting, 1)
    assert second.reservation is not None and second.reservation.kv_bytes == 2 * BLOCK
    assert new.reservations.total_reserved() == 2 * BLOCK and tenant.active == 1
    assert old.router.inflight == {"big": 1}  # one routed request left, counted once
    await new.finish(second, "ok")
    assert new.reservations.total_reserved() == 0 and tenant.active == 0
    assert new.router.inflight == {"big": 0}


async def test_a_lower_limit_keeps_what_was_taken() -> None:
    clock = FakeClock()
    backends = {"big": FakeBackend("big"), "small": FakeBackend("small")}
    old = chain(config({"requests_per_minute": 10}), backends, clock)
    for _ in range(3):
        c = ctx()
        await old.apply(c)
        await old.finish(c, "ok")
    new = chain(config({"requests_per_minute": 3}), backends, clock, old)
    with pytest.raises(RateLimited):  # 3 taken this minute: a reload gives no fresh bucket
        await new.apply(ctx())
    clock.now += 20  # a third of a minute refills one request at the new rate
    c = ctx()
    await new.apply(c)
    await new.finish(c, "ok")


async def test_without_previous_every_chain_starts_empty() -> None:
    clock = FakeClock()
    backends = {"big": FakeBackend("big"), "small": FakeBackend("small")}
    a = chain(config({}), backends, clock)
    b = chain(config({}), backends, clock)
    assert a.reservations is not b.reservations and a.router is not b.router
