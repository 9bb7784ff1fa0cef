"""Hypothesis: the policies' arithmetic holds for any sequence of requests.

Token buckets never exceed their size and a wait they announce is enough; admission's
reservations never add up to more than a backend's budget and return to zero; context_trim
never drops the last user message (or a system message) and what it keeps fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.errors import ContextLengthExceeded, GatewayError
from policies.admission import Admission
from policies.context_trim import ContextTrim
from policies.leases import Bucket, LocalBook
from tests.policies.fakes import FakeBackend, FakeClock, ctx, make
from tests.policies.fakes import settings as make_settings

BLOCK = 16 * 2048  # the fake backend's block in bytes
FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------- token bucket

BUCKET_OPS = st.lists(st.tuples(st.sampled_from(["take", "settle", "tick"]),
                                st.floats(-500, 5000, allow_nan=False)), max_size=40)


@FAST
@given(st.integers(1, 100_000), BUCKET_OPS)
def test_rate_bucket_level_and_waits(per_minute: int, ops: list[tuple[str, float]]) -> None:
    """A take either takes (the level drops by the amount) or leaves the level alone and
    announces a wait after which it succeeds; the level never passes the size."""
    clock = FakeClock()
    book = LocalBook(clock)
    for op, x in ops:
        if op == "settle":
            book.settle([Bucket("b", per_minute, x)])
        elif op == "tick":
            clock.now += abs(x) / 100
        else:
            x = abs(x)
            before = book.level("b", per_minute)
            wait = book.take([Bucket("b", per_minute, x)])
            if x > per_minute:
                assert wait == math.inf and book.level("b", per_minute) == before
            elif wait == 0:
                assert book.level("b", per_minute) == pytest.approx(before - x, abs=1e-6)
            else:
                assert book.level("b", per_minute) == before
                clock.now += wait
                assert book.take([Bucket("b", per_minute, x)]) <= 1e-6 * max(1.0, x)
        assert book.level("b", per_minute) <= per_minute + 1e-9


# ---------------------------------------------------------------- admission / ledger

REQUEST = st.tuples(st.sampled_from(["acme", "globex"]), st.integers(0, 120), st.integers(1, 200))
ADMISSION_OPS = st.lists(
    st.one_of(st.tuples(st.just("submit"), REQUEST), st.tuples(st.just("finish"), st.integers(0, 50)),
              st.tuples(st.just("cancel"), st.integers(0, 50))),
    max_size=40)
TENANTS = [{"name": "acme", "priority": "high", "limits": {"max_concurrency": 3, "max_kv_share": 0.6}},
           {"name": "globex", "limits": {"tokens_per_minute": 2000}}]


def _check_ledger(a: Admission, live: list[Any]) -> None:
    for name, pool in a.reservations.pools.items():
        held = [c.reservation.kv_bytes for c in live if c.reservation and c.backend == name
                and not c.reservation.released]
        assert pool.reserved == sum(held)
        assert pool.budget is None or pool.reserved <= pool.budget
        assert sum(pool.by_tenant.values()) == pool.reserved
        assert pool.queued >= 0


async def _settle() -> None:
    """Let every ready task run until the loop is quiet: a grant resolves the waiter's
    future at once, but the waiting task learns of it (ctx.reservation) a few loop turns
    later, through asyncio.wait's own callbacks."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _drive(blocks: int, ops: list[tuple[str, Any]]) -> None:
    s = make_settings(TENANTS, policy_options={"admission": {"queue_timeout_s": 30}})
    a = make(Admission, s, {"big": FakeBackend("big", blocks * BLOCK, window=512),
                          "small": FakeBackend("small")})
    tasks: list[tuple[asyncio.Task[Any], Any]] = []
    for op, arg in ops:
        if op == "submit":
            tenant, words, max_tokens = arg
            c = ctx(tenant=tenant, words=words, max_tokens=max_tokens)
            tasks.append((asyncio.ensure_future(a.apply(c)), c))
        else:
            done = [(t, c) for t, c in tasks if t.done() and not t.cancelled() and not t.exception()]
            waiting = [(t, c) for t, c in tasks if not t.done()]
            pick = done if op == "finish" else waiting
            if pick:
                t, c = pick[arg % len(pick)]
                if op == "finish":
                    await a.on_finish(c, "ok")
                else:
                    t.cancel()
                tasks.remove((t, c))
        await _settle()
        _check_ledger(a, [c for _, c in tasks])
    while tasks:  # the end: everyone leaves, one way or another
        t, c = tasks.pop()
        if not t.done():
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, GatewayError):
            await t
        await a.on_finish(c, "cancelled")
        await _settle()
        _check_ledger(a, [c for _, c in tasks])
    assert a.reservations.total_reserved() == 0 and a.waiting == 0
    assert all(p.queued == 0 and not p.by_tenant for p in a.reservations.pools.values())


@FAST
@given(st.integers(1, 24), ADMISSION_OPS)
def test_reservations_never_exceed_the_budget_and_return_to_zero(
        blocks: int, ops: list[tuple[str, Any]]) -> None:
    asyncio.run(_drive(blocks, ops))


# ---------------------------------------------------------------- context_trim

MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": st.integers(0, 30).map(lambda n: "w " * n),
})


@FAST
@given(st.lists(MESSAGE, min_size=1, max_size=14), st.sampled_from(["drop_oldest", "middle_out"]),
       st.integers(1, 250))
def test_trim_keeps_the_last_user_message_and_fits(
        messages: list[dict[str, str]], strategy: str, max_tokens: int) -> None:
    messages = [{**m, "content": f"m{i} {m['content']}"} for i, m in enumerate(messages)]
    policy = make(ContextTrim, make_settings([{"name": "acme", "trim": {"strategy": strategy}}]))
    c = ctx(messages=list(messages), max_tokens=max_tokens)
    try:
        asyncio.run(policy.apply(c))
    except ContextLengthExceeded:
        return
    kept = c.messages or []
    assert all(m in messages for m in kept)
    assert [m for m in messages if m["role"] == "system"] == [m for m in kept if m["role"] == "system"]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
        tail = messages[users[-1]:]
        assert kept[-len(tail):] == tail  # the last user message and what follows it
    assert (c.prompt_tokens or 0) <= 256 - max_tokens  # the fake backend's window
    assert [messages.index(m) for m in kept] == sorted(messages.index(m) for m in kept)
