"""Request priority: x-gateway-priority lowers a request's class (never raises it), `low`
requests of a shed_low tenant are refused at saturation instead of queueing, and a `high`
request never waits behind a `low` one."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.context import RequestContext
from gateway.core.errors import InvalidRequest, RateLimited
from policies.admission import Admission
from policies.priority import from_headers, request_priority
from tests.policies.fakes import FakeBackend, ctx, make, settings

BLOCK = 16 * 2048


def admission(tenants: list[dict[str, object]], blocks: int = 4) -> Admission:
    s = settings(tenants, policy_options={"admission": {"queue_timeout_s": 30.0}})
    return make(
        Admission, s, {"big": FakeBackend("big", blocks * BLOCK), "small": FakeBackend("small")}
    )


def request(tenant: str, priority: str, words: int = 10) -> RequestContext:
    c = ctx(tenant=tenant, words=words)  # 12 + 16 tokens: 2 blocks
    c.priority = priority
    return c


def test_a_request_may_lower_its_class_never_raise_it() -> None:
    s = settings([{"name": "acme", "priority": "normal"}])
    acme = s.tenants[0]
    assert request_priority(acme, None) == "normal"
    assert request_priority(acme, "low") == "low"
    assert request_priority(acme, " Normal ") == "normal"
    with pytest.raises(InvalidRequest) as info:
        request_priority(acme, "high")
    assert info.value.status == 400 and info.value.code == "priority_not_allowed"
    assert info.value.param == "x-gateway-priority"
    with pytest.raises(InvalidRequest) as info:
        request_priority(acme, "urgent")
    assert info.value.code == "invalid_priority"
    assert from_headers(acme, [(b"x-gateway-priority", b"low")]) == "low"
    assert from_headers(acme, [(b"other", b"high")]) == "normal"


async def test_low_requests_of_a_shed_low_tenant_are_refused_at_saturation() -> None:
    a = admission([{"name": "acme", "shed_low": True}, {"name": "globex"}])
    low = request("acme", "low")
    await a.apply(low)  # room: a low request is admitted like any other
    hog = request("globex", "normal")
    await a.apply(hog)  # the 4 blocks are held now
    with pytest.raises(RateLimited) as info:
        await a.apply(request("acme", "low"))
    assert info.value.code == "low_priority_shed" and info.value.status == 429
    assert int(info.value.response_headers()["retry-after"]) >= 1
    assert a.waiting == 0  # refused at once, never queued
    queued = asyncio.ensure_future(a.apply(request("acme", "normal")))  # normal ones queue
    globex_low = asyncio.ensure_future(a.apply(request("globex", "low")))  # not shed_low
    await asyncio.sleep(0.01)
    assert a.waiting == 2 and not queued.done()
    await a.on_finish(low, "ok")
    await asyncio.wait_for(queued, 1)
    await a.on_finish(hog, "ok")
    await asyncio.wait_for(globex_low, 1)


async def test_high_never_waits_behind_low() -> None:
    a = admission([{"name": "acme", "priority": "high"}, {"name": "globex"}], blocks=6)
    hog = request("globex", "normal", words=40)  # 58 tokens: 4 blocks
    await a.apply(hog)
    order: list[str] = []

    def queue(tenant: str, priority: str, words: int = 10) -> RequestContext:
        c = request(tenant, priority, words)
        task = asyncio.ensure_future(a.apply(c))
        task.add_done_callback(lambda _: order.append(f"{tenant}:{priority}"))
        return c

    big_low = queue("globex", "low", words=40)  # 4 blocks: waits for the hog
    await asyncio.sleep(0)
    lowered = queue("acme", "low")  # acme's own request, lowered by its header
    await asyncio.sleep(0)
    high = queue("acme", "high")  # 2 blocks fit now, but low ones came first
    await asyncio.sleep(0.01)
    assert order == ["acme:high"]  # a low request waiting for room does not block it
    assert high.reservation is not None and big_low.reservation is None
    await a.on_finish(hog, "ok")
    await asyncio.sleep(0.01)
    await a.on_finish(high, "ok")
    await asyncio.sleep(0.01)
    assert order[:2] == ["acme:high", "globex:low"] and lowered.reservation is not None
