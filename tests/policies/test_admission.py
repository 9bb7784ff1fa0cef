"""admission: reservations, quotas, the priority queue, refusals with the right status."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.core.context import Usage
from gateway.core.errors import ContextLengthExceeded, RateLimited, Unavailable
from gateway.core.kv import Lanes
from policies.admission import Admission
from tests.policies.fakes import FakeBackend, FakeClock, ctx, make, settings

BLOCK = 16 * 2048  # the fake backend's block in bytes


def admission(tenants: list[dict] | None = None, blocks: int | None = 64, timeout: float = 5.0,
              clock: FakeClock | None = None) -> Admission:
    s = settings(tenants, policy_options={"admission": {"queue_timeout_s": timeout}})
    kv = None if blocks is None else blocks * BLOCK
    return make(Admission, s, {"big": FakeBackend("big", kv), "small": FakeBackend("small")}, clock)


def tokens_left(a: Admission, tenant: str = "acme") -> float:
    limit = a.env.tenants[tenant].limits.tokens_per_minute
    return a.quotas.book.level(f"rate:{tenant}:tokens", limit)  # type: ignore[attr-defined]


def requests_left(a: Admission, tenant: str = "acme") -> float:
    limit = a.env.tenants[tenant].limits.requests_per_minute
    return a.quotas.book.level(f"rate:{tenant}:requests", limit)  # type: ignore[attr-defined]


async def test_reserves_whole_blocks_and_releases() -> None:
    a = admission()
    c = ctx(words=10, max_tokens=16)  # 12 prompt + 16 = 28 tokens -> 2 blocks
    d = await a.apply(c)
    assert d.action == "pass"
    assert c.reservation.kv_bytes == 2 * BLOCK == c.memory.kv_bytes_reserved
    assert a.reservations.total_reserved() == 2 * BLOCK
    assert a.reservations.reserved_by_tenant() == {"acme": 2 * BLOCK}
    await a.on_finish(c, "ok")
    await a.on_finish(c, "ok")  # twice is harmless
    assert a.reservations.total_reserved() == 0 and a.reservations.reserved_by_tenant() == {}


async def test_never_fits_is_400_not_a_queue() -> None:
    a = admission(blocks=4)
    with pytest.raises(ContextLengthExceeded) as info:
        await a.apply(ctx(words=60, max_tokens=16))  # 78 tokens -> 5 blocks > 4
    assert info.value.status == 400 and a.waiting == 0


async def test_share_and_tpm_that_can_never_fit_are_429_without_retry() -> None:
    a = admission([{"name": "acme", "limits": {"max_kv_share": 0.25, "tokens_per_minute": 1000}}],
                  blocks=8)
    with pytest.raises(RateLimited) as info:
        await a.apply(ctx(words=40, max_tokens=16))  # 3 blocks > 2 (a quarter of 8)
    assert info.value.headers["x-should-retry"] == "false"
    assert info.value.response_headers()["retry-after"]
    a = admission([{"name": "acme", "limits": {"tokens_per_minute": 20}}])
    with pytest.raises(RateLimited) as info:
        await a.apply(ctx(words=10, max_tokens=16))
    assert info.value.code == "tokens_per_minute_exceeded"
    assert info.value.headers["x-should-retry"] == "false"


async def test_requests_per_minute_bucket_sets_retry_after() -> None:
    clock = FakeClock()
    a = admission([{"name": "acme", "limits": {"requests_per_minute": 2}}], clock=clock)
    for _ in range(2):
        c = ctx()
        await a.apply(c)
        await a.on_finish(c, "ok")
    with pytest.raises(RateLimited) as info:
        await a.apply(ctx())
    assert info.value.status == 429
    assert info.value.response_headers()["retry-after"] == "30"  # one request per 30 s
    assert "x-should-retry" not in info.value.headers
    clock.now += 30
    await a.apply(ctx())


async def test_tokens_per_minute_bucket() -> None:
    clock = FakeClock()
    a = admission([{"name": "acme", "limits": {"tokens_per_minute": 60}}], clock=clock)
    await a.apply(ctx(words=10, max_tokens=16))  # 28 tokens
    await a.apply(ctx(words=10, max_tokens=16))  # 56
    with pytest.raises(RateLimited) as info:
        await a.apply(ctx(words=10, max_tokens=16))
    assert info.value.retry_after == pytest.approx(24)  # 24 tokens short at 1 token/s


async def test_tokens_per_minute_keeps_what_was_used_not_max_tokens() -> None:
    """A finished request gives back the tokens of max_tokens it did not generate; one that
    ended without usage (or was cancelled) keeps the whole charge."""
    clock = FakeClock()
    a = admission([{"name": "acme", "limits": {"tokens_per_minute": 60}}], clock=clock)
    c = ctx(words=10, max_tokens=16)  # 28 tokens charged
    await a.apply(c)
    c.usage = Usage(prompt_tokens=12, completion_tokens=3)  # 15 used
    await a.on_finish(c, "ok")
    await a.on_finish(c, "ok")  # the refund is given once
    assert tokens_left(a) == pytest.approx(60 - 15)
    c = ctx(words=10, max_tokens=16)
    await a.apply(c)
    await a.on_finish(c, "cancelled")
    assert tokens_left(a) == pytest.approx(60 - 15 - 28)


async def test_a_retried_attempt_is_not_charged_twice() -> None:
    """The pipeline's failover finishes the failed attempt with "retried" and applies the
    chain again: the request is charged once, by its last attempt."""
    clock = FakeClock()
    a = admission([{"name": "acme", "limits": {"requests_per_minute": 2, "tokens_per_minute": 60}}],
                  clock=clock)
    c = ctx(words=10, max_tokens=16)
    await a.apply(c)
    await a.on_finish(c, "retried")
    c.reservation = None
    await a.apply(c)  # the second attempt
    assert requests_left(a) == pytest.approx(1) and tokens_left(a) == pytest.approx(60 - 28)
    await a.on_finish(c, "error")  # failed for good: the charge stands
    assert requests_left(a) == pytest.approx(1) and tokens_left(a) == pytest.approx(60 - 28)


async def test_waits_for_capacity_then_runs() -> None:
    a = admission(blocks=4)
    first = ctx(words=40, max_tokens=16)  # 58 tokens -> 4 blocks: the whole budget
    await a.apply(first)
    second = ctx(words=10)
    task = asyncio.ensure_future(a.apply(second))
    await asyncio.sleep(0.01)
    assert not task.done() and a.waiting == 1
    assert a.reservations.pools["big"].queued == 2 * BLOCK
    await a.on_finish(first, "ok")
    await asyncio.wait_for(task, 1)
    assert second.reservation.kv_bytes == 2 * BLOCK and a.waiting == 0
    assert a.reservations.pools["big"].queued == 0


async def test_queue_timeout_is_503_with_retry_after_from_drain_rate() -> None:
    clock = FakeClock()
    a = admission(blocks=4, timeout=0.05, clock=clock)
    done = ctx(words=10)
    await a.apply(done)
    clock.now += 10
    await a.on_finish(done, "ok")  # 2 blocks drained in the first 10 s
    hog = ctx(words=40, max_tokens=16)
    await a.apply(hog)
    with pytest.raises(Unavailable) as info:
        await a.apply(ctx(words=10))
    assert info.value.status == 503
    # 2 blocks short, drained 2 blocks per 10 s -> 10 s
    assert info.value.response_headers()["retry-after"] == "10"
    assert a.waiting == 0 and a.reservations.total_reserved() == 4 * BLOCK


async def test_tenant_concurrency_waits_and_times_out_as_429() -> None:
    a = admission([{"name": "acme", "limits": {"max_concurrency": 1}}, {"name": "globex"}],
                  timeout=0.05)
    held = ctx()
    await a.apply(held)
    with pytest.raises(RateLimited) as info:
        await a.apply(ctx())
    assert info.value.code == "tenant_capacity_exceeded"
    await a.apply(ctx(tenant="globex"))  # another tenant is not held up


async def test_high_priority_goes_first() -> None:
    a = admission([{"name": "acme", "priority": "low"}, {"name": "globex", "priority": "high"}],
                  blocks=2)
    hog = ctx(words=10)
    await a.apply(hog)
    order: list[str] = []

    async def run(tenant: str) -> None:
        c = ctx(tenant=tenant)
        await a.apply(c)
        order.append(tenant)
        await asyncio.sleep(0)
        await a.on_finish(c, "ok")

    low = asyncio.ensure_future(run("acme"))
    await asyncio.sleep(0)
    high = asyncio.ensure_future(run("globex"))
    await asyncio.sleep(0.01)
    await a.on_finish(hog, "ok")
    await asyncio.wait_for(asyncio.gather(low, high), 1)
    assert order == ["globex", "acme"]


async def test_equal_priority_tenants_share_fairly() -> None:
    """acme queues 20 requests before globex's 5; globex is not served last."""
    a = admission([{"name": "acme"}, {"name": "globex"}], blocks=4)  # 2 requests at a time
    order: list[str] = []

    async def run(tenant: str) -> None:
        c = ctx(tenant=tenant)
        await a.apply(c)
        order.append(tenant)
        await asyncio.sleep(0.001)
        await a.on_finish(c, "ok")

    tasks = [asyncio.ensure_future(run("acme")) for _ in range(20)]
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(run("globex")) for _ in range(5)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    last_globex = max(i for i, t in enumerate(order) if t == "globex")
    assert last_globex < 14, order  # FIFO would serve globex at 20..24


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    a = admission(blocks=2)
    hog = ctx()
    await a.apply(hog)
    task = asyncio.ensure_future(a.apply(ctx()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.waiting == 0 and a.reservations.pools["big"].queued == 0
    await a.on_finish(hog, "ok")
    assert a.reservations.total_reserved() == 0


async def test_backend_without_capacity_only_quotas_apply() -> None:
    a = admission([{"name": "acme", "limits": {"max_concurrency": 2}}], blocks=None, timeout=0.02)
    held = [ctx(words=5000), ctx(words=5000)]
    for c in held:
        await a.apply(c)
        assert c.reservation.kv_bytes == 0
    with pytest.raises(RateLimited):
        await a.apply(ctx())


async def test_random_load_never_exceeds_the_budget() -> None:
    rng = random.Random(7)
    a = admission([{"name": "acme", "priority": "high"}, {"name": "globex"},
                   {"name": "initech", "priority": "low", "limits": {"max_kv_share": 0.5}}],
                  blocks=16, timeout=2)
    budget = 16 * BLOCK
    peak = 0
    refused: list[int] = []

    async def one(i: int) -> None:
        nonlocal peak
        c = ctx(tenant=rng.choice(["acme", "globex", "initech"]), words=rng.randint(1, 100),
                max_tokens=rng.randint(1, 60))
        try:
            try:
                await a.apply(c)
            except RateLimited:  # over initech's share: refused, never queued
                refused.append(i)
                return
            peak = max(peak, a.reservations.total_reserved())
            assert a.reservations.total_reserved() <= budget
            await asyncio.sleep(rng.random() * 0.005)
        finally:
            await a.on_finish(c, "ok")

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 20)
    assert peak > budget // 2
    assert 0 < len(refused) < 100
    assert a.reservations.total_reserved() == 0 and a.waiting == 0


async def test_a_rate_limited_request_holds_nothing() -> None:
    """Refused by its rate bucket before it was granted: no bytes reserved, no slot taken
    (found by the e2e burst test: a refused request kept its reservation)."""
    a = admission([{"name": "acme", "limits": {"requests_per_minute": 1, "max_concurrency": 1}}])
    c = ctx()
    await a.apply(c)
    await a.on_finish(c, "ok")
    with pytest.raises(RateLimited):
        await a.apply(ctx())
    assert a.reservations.total_reserved() == 0 and a._tenants["acme"].active == 0


async def test_length_lanes_let_short_requests_pass_a_flood_of_long_ones() -> None:
    s = settings(None, policy_options={"admission": {"queue_timeout_s": 5.0}})
    lanes = Lanes(short_max_tokens=64, short_share=0.25)
    a = make(Admission, s, {"big": FakeBackend("big", 8 * BLOCK, lanes=lanes),
                            "small": FakeBackend("small")})
    longs = [ctx(words=40, max_tokens=40) for _ in range(4)]  # 82 tokens: long, 6 blocks
    first = longs[0]
    await a.apply(first)  # 6 of the long lane's 6 blocks
    waiting = [asyncio.ensure_future(a.apply(c)) for c in longs[1:]]
    await asyncio.sleep(0.01)
    assert a.waiting == 3 and a.reservations.pools["big"].long_reserved == 6 * BLOCK
    short = ctx(words=10, max_tokens=16)  # 28 tokens: short, 2 blocks of the short share
    await asyncio.wait_for(a.apply(short), 1)  # passes the long ones queued before it
    assert short.reservation is not None and not short.reservation.long
    assert a.waiting == 3 and a.reservations.total_reserved() == 8 * BLOCK
    await a.on_finish(first, "ok")
    await asyncio.wait_for(waiting[0], 1)  # the next long one, in its lane's order
    assert [t.done() for t in waiting] == [True, False, False]
    for t in waiting[1:]:
        t.cancel()
    await asyncio.gather(*waiting[1:], return_exceptions=True)
    await a.on_finish(short, "ok")
    await a.on_finish(longs[1], "ok")
    pool = a.reservations.pools["big"]
    assert pool.reserved == pool.long_reserved == pool.queued == 0 and a.waiting == 0
