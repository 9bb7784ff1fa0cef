"""The fleet's adapter residency against a real Redis: pins, loads with their victims, waits,
and the script answering as its plain-Python reference (LocalResidency)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.residency import PinAnswer
from policies.redis_quotas import RedisQuotas, SharedStateConfig
from policies.shared_residency import LocalResidency, SharedResidency

_prefixes = itertools.count()


async def fleet(url: str) -> SharedResidency:
    shared = RedisQuotas(SharedStateConfig(redis_url=url, key_prefix=f"res{next(_prefixes)}:"))
    await shared.start()
    return SharedResidency(shared)


@pytest.fixture
async def residency(redis_url: str) -> AsyncIterator[SharedResidency]:
    r = await fleet(redis_url)
    yield r
    await r.shared.aclose()


async def test_one_load_then_hits_and_pinned_adapters_are_never_victims(
        residency: SharedResidency) -> None:
    r, s = residency, "vllm"
    assert await r.pin(s, "a", 60, 100, "p1") == PinAnswer("load")
    assert await r.pin(s, "a", 60, 100, "p2") == PinAnswer("wait")  # loading elsewhere
    await r.loaded(s, "a", ok=True)
    assert r.resident(s) == {"a": 60}
    assert await r.pin(s, "a", 60, 100, "p2") == PinAnswer("hit")
    assert await r.pin(s, "b", 60, 100, "p3") == PinAnswer("wait")  # a is pinned: no room
    await r.unpin(s, "a", "p1")
    assert await r.pin(s, "b", 60, 100, "p3") == PinAnswer("wait")  # still pinned by p2
    await r.unpin(s, "a", "p2")
    assert await r.pin(s, "b", 60, 100, "p3") == PinAnswer("load", ("a",))
    assert await r.pin(s, "a", 60, 100, "p4") == PinAnswer("wait")  # being unloaded
    await r.unloaded(s, "a")
    await r.loaded(s, "b", ok=True)
    assert r.resident(s) == {"b": 60}


async def test_a_failed_load_is_forgotten(residency: SharedResidency) -> None:
    r = residency
    assert (await r.pin("v", "a", 10, 100, "p")).action == "load"
    await r.loaded("v", "a", ok=False)
    assert (await r.pin("v", "a", 10, 100, "q")).action == "load"  # tried again


OPS = st.lists(st.tuples(st.sampled_from(["pin", "ok", "failed", "unloaded", "unpin"]),
                         st.sampled_from("abcd"), st.integers(0, 3)), max_size=30)
SIZES = {"a": 40, "b": 30, "c": 50, "d": 20}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(OPS)
def test_the_script_answers_as_the_reference(redis_url: str, ops: list[tuple[str, str, int]]) -> None:
    async def run() -> None:
        r = await fleet(redis_url)
        ref = LocalResidency()
        try:
            for op, adapter, pin_no in ops:
                pin = f"{adapter}{pin_no}"
                if op == "pin":
                    assert await r.pin("v", adapter, SIZES[adapter], 100, pin) == \
                        ref.pin("v", adapter, SIZES[adapter], 100, pin)
                elif op == "unpin":
                    await r.unpin("v", adapter, pin)
                    ref.unpin("v", adapter, pin)
                else:
                    await (r.loaded("v", adapter, op == "ok") if op != "unloaded"
                           else r.unloaded("v", adapter))
                    ref.done("v", adapter, op, "")
                    assert r.resident("v") == ref.resident("v")
        finally:
            await r.shared.aclose()

    asyncio.run(run())
