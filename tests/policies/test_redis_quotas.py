"""The shared state against a real Redis: the Lua scripts against their plain-Python
reference (policies/leases.py), leases that expire and are renewed, Redis down and back."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.errors import Unavailable
from policies.leases import Bucket, LocalBook, Scope
from policies.redis_quotas import RedisQuotas, SharedStateConfig
from tests.redis_server import RedisServer

_prefixes = itertools.count()


def config(url: str, **kw: object) -> SharedStateConfig:
    return SharedStateConfig(redis_url=url, key_prefix=f"t{next(_prefixes)}:", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def shared(redis_url: str) -> AsyncIterator[RedisQuotas]:
    s = RedisQuotas(config(redis_url))
    await s.start()
    yield s
    await s.aclose()


async def test_rate_buckets_take_all_or_none_and_announce_the_wait(shared: RedisQuotas) -> None:
    both = [Bucket("r", 60, 1), Bucket("t", 600, 500)]
    assert await shared.take(both) == 0
    wait = await shared.take([Bucket("r", 60, 1), Bucket("t", 600, 500)])  # 100 tokens left
    assert 39 < wait <= 40  # 400 tokens short at 10 a second
    assert await shared.take([Bucket("r", 60, 59)]) == 0  # the refused take took nothing
    assert await shared.take([Bucket("r", 60, 1)]) > 0
    await shared.settle([Bucket("t", 600, 450)])  # the answer used 50 of the 500 charged
    assert await shared.take([Bucket("t", 600, 540)]) == 0
    await shared.settle([Bucket("t", 600, -100)])  # used more than charged: a debt
    wait = await shared.take([Bucket("t", 600, 1)])
    assert 9 < wait <= 10.2  # 100 tokens in debt (and a little refilled meanwhile)


async def test_a_lowered_limit_applies_to_a_live_bucket_at_its_next_check(shared: RedisQuotas) -> None:
    assert await shared.take([Bucket("r", 100, 10)]) == 0  # 10 taken, 90 left of 100
    # under a limit of 20 what was taken still counts: 10 left, not a fresh bucket
    assert await shared.take([Bucket("r", 20, 15)]) > 0
    assert await shared.take([Bucket("r", 20, 10)]) == 0
    assert await shared.take([Bucket("r", 20, 5)]) > 0


async def test_leases_hold_limits_and_release(shared: RedisQuotas) -> None:
    scopes = [Scope("c:acme", 2, 1), Scope("kv:b", 100, 60)]
    assert await shared.acquire("a", scopes) == -1
    assert await shared.acquire("b", [Scope("c:acme", 2, 1), Scope("kv:b", 100, 50)]) == 1
    assert await shared.acquire("c", [Scope("c:acme", 2, 1), Scope("kv:b", 100, 40)]) == -1
    assert await shared.acquire("d", [Scope("c:acme", 2, 1)]) == 0  # two held
    await shared.release("a", scopes)
    assert await shared.acquire("d", [Scope("c:acme", 2, 1), Scope("kv:b", 100, 60)]) == -1


async def test_an_unrenewed_lease_is_reclaimed_within_its_ttl_and_a_renewed_one_is_not(
        redis_url: str) -> None:
    cfg = config(redis_url, lease_ttl_s=0.6)
    holder = RedisQuotas(cfg)  # its keep-alive stopped below: a SIGKILLed peer
    renewed, other = RedisQuotas(cfg), RedisQuotas(cfg)
    for s in (holder, renewed, other):
        await s.start()
    assert holder._loop is not None
    holder._loop.cancel()  # the dead process: no more heartbeats or renewals
    one = [Scope("c", 2, 1)]
    assert await holder.acquire("dead", one) == -1
    assert await renewed.acquire("alive", one) == -1
    assert await other.acquire("x", one) == 0  # both slots held
    start = time.monotonic()
    while await other.acquire("x", one) != -1:  # the dead lease comes back, and only it
        assert time.monotonic() - start < 10, "the dead process's lease was never reclaimed"
        await asyncio.sleep(0.05)
    assert await other.acquire("y", one) == 0  # the renewed lease still holds its slot
    for s in (renewed, other):
        await s.aclose()


async def test_a_release_completes_when_the_caller_is_cancelled(shared: RedisQuotas) -> None:
    one = [Scope("c", 1, 1)]
    assert await shared.acquire("a", one) == -1
    task = asyncio.ensure_future(shared.release("a", one))
    await asyncio.sleep(0)
    task.cancel()
    start = time.monotonic()
    while await shared.acquire("b", one) != -1:
        assert time.monotonic() - start < 5
        await asyncio.sleep(0.01)


async def test_redis_down_local_share_divides_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    cfg = config(server.url, timeout_s=0.3)
    a, b, c = (RedisQuotas(cfg) for _ in range(3))
    try:
        for s in (a, b, c):
            await s.start()
        await a._beat()
        assert a.processes == 3
        server.stop()
        # concurrency 7 over 3 live processes: 2 here, never 7
        got = [await a.acquire(f"l{i}", [Scope("c", 7, 1)]) for i in range(4)]
        assert got == [-1, -1, 0, 0] and not a.up and a.fallbacks["local_share"] == 4
        # 60 requests a minute: 20 here
        taken = 0
        while await a.take([Bucket("r", 60, 1)]) == 0:
            taken += 1
        assert taken == 20
        server.start()  # the same port; the next probe (a second later) finds it
        start = time.monotonic()
        while not (await a.acquire("back", [Scope("c2", 7, 1)]) == -1 and a.up):
            assert time.monotonic() - start < 10, "Redis came back but was not used again"
            await asyncio.sleep(0.1)
    finally:
        for s in (a, b, c):
            await s.aclose()
        server.stop()


async def test_redis_down_reject_is_503(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    s = RedisQuotas(config(server.url, on_unavailable="reject", timeout_s=0.3))
    await s.start()
    server.stop()
    with pytest.raises(Unavailable) as info:
        await s.acquire("x", [Scope("c", 4, 1)])
    assert info.value.status == 503 and info.value.response_headers()["retry-after"]
    with pytest.raises(Unavailable):
        await s.take([Bucket("r", 60, 1)])
    assert s.fallbacks["reject"] == 2
    await s.aclose()


# ---------------------------------------------------------------- the scripts = the reference

OPS = st.lists(st.tuples(st.sampled_from(["acquire", "release"]), st.integers(0, 5),
                         st.integers(1, 40), st.booleans()), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(OPS)
def test_lease_script_answers_as_the_reference(redis_url: str, ops: list[tuple[str, int, int, bool]]) -> None:
    """Random acquires and releases (no expiry in play): Redis and the plain-Python book
    give the same answer to every one."""

    async def run() -> None:
        shared = RedisQuotas(config(redis_url, lease_ttl_s=600))
        await shared.start()
        book = LocalBook(time.monotonic)
        try:
            for op, lease, amount, two in ops:
                scopes = [Scope("conc", 3, 1), Scope("kv", 100, amount)][: 2 if two else 1]
                if op == "acquire":
                    if f"l{lease}" in shared._held:
                        continue
                    want = book.acquire(f"l{lease}", scopes, 600)
                    assert await shared.acquire(f"l{lease}", scopes) == want
                else:
                    book.release(f"l{lease}", [s.key for s in scopes])
                    await shared.release(f"l{lease}", scopes)
        finally:
            await shared.aclose()

    asyncio.run(run())


async def test_admit_and_finish_are_take_acquire_and_release_settle_in_one_trip(
        shared: RedisQuotas) -> None:
    rpm = [Bucket("r", 60, 1)]
    one = [Scope("c", 1, 1)]
    assert await shared.admit(rpm, "a", one) == (0.0, -1)  # taken and held
    assert await shared.admit(rpm, "b", one) == (0.0, 0)  # taken, the slot is a's
    assert await shared.take([Bucket("r", 60, 58)]) == 0  # 2 of 60 were taken
    wait, failed = await shared.admit(rpm, "c", one)  # the bucket is empty: nothing taken
    assert wait > 0 and failed == -1 and "c" not in shared._held
    await shared.finish([Bucket("r", 60, 1)], "a", one)  # a's slot back, a request given back
    assert await shared.admit(rpm, "d", one) == (0.0, -1)


async def test_replica_affinity_reaches_the_other_processes(redis_url: str) -> None:
    from gateway.core.config import ModelConfig
    from gateway.core.context import RequestContext, SamplingParams
    from policies.registry import build_chain
    from tests.policies.fakes import FakeBackend

    cfg = config(redis_url)
    model = ModelConfig(name="m", backends=("r1", "r2"))
    routers = []
    for _ in range(2):
        shared = RedisQuotas(cfg)
        await shared.start()
        chain = build_chain(["routing"], {}, [model], [], {"r1": FakeBackend("r1"),
                            "r2": FakeBackend("r2")}, quotas=shared)
        routers.append((shared, chain.policies[0].env.router))  # type: ignore[attr-defined]
    (a, router_a), (b, router_b) = routers
    router_a.inflight["r1"] = 5  # a sends the adapter to the less loaded r2, and publishes it
    ctx = RequestContext(request_id="x", tenant="t", kind="chat", requested_model="m",
                         target_model="m", backend="r1", sampling=SamplingParams(), adapter="ad")
    assert router_a.route(ctx, model, {"r1": FakeBackend("r1"), "r2": FakeBackend("r2")}) == "r2"
    await asyncio.gather(*a._pending)
    await b._beat()
    assert router_b.affinity[("m", "ad")] == "r2"
    for s in (a, b):
        await s.aclose()
