"""The completion-length estimate, and the one rule: tokens per minute charge prompt + the
estimate at admission and settle to the usage at the end."""

from __future__ import annotations

import pytest

from gateway.core.context import Usage
from policies.admission import Admission
from policies.estimate import Estimates, kv_output_tokens
from tests.policies.fakes import FakeBackend, FakeClock, ctx, make, settings

KEY = ("acme", "large", "")


def test_worst_case_until_enough_samples_then_the_p90_bounded_by_the_limit() -> None:
    e = Estimates(min_samples=20)
    for n in range(19):
        e.observe(KEY, n)
    assert e.p90(KEY) is None and e.expected(KEY, 500) == 500  # 19 samples: the limit
    e.observe(KEY, 19)  # 0..19: nearest-rank p90 of 20 values is the 18th smallest
    assert e.p90(KEY) == 17 and e.expected(KEY, 500) == 17
    assert e.expected(KEY, 10) == 10  # never above the request's own limit
    assert e.expected(("acme", "large", "acme-support"), 500) == 500  # keys do not mix


def test_the_window_forgets_old_lengths() -> None:
    e = Estimates(min_samples=20, window=20)
    for _ in range(20):
        e.observe(KEY, 400)
    assert e.p90(KEY) == 400
    for _ in range(20):
        e.observe(KEY, 5)
    assert e.p90(KEY) == 5 and e.samples(KEY) == 20


def test_kv_admission_seam() -> None:
    assert kv_output_tokens(256, 40) == 256  # worst case: the default today
    assert kv_output_tokens(256, 40, "estimate") == 40
    with pytest.raises(ValueError):
        kv_output_tokens(256, 40, "optimistic")
    with pytest.raises(ValueError):
        Estimates(min_samples=30, window=20)


async def test_tokens_per_minute_charge_the_estimate_and_settle_to_usage() -> None:
    clock = FakeClock()
    s = settings([{"name": "acme", "limits": {"tokens_per_minute": 1000}}])
    a = make(Admission, s, {"big": FakeBackend("big"), "small": FakeBackend("small")}, clock)
    bucket = "rate:acme:tokens"
    for _ in range(20):  # twenty answers of 4 tokens: the estimate becomes 4
        c = ctx(words=10, max_tokens=200)  # 12 prompt tokens
        await a.apply(c)
        assert c.reservation is not None
        c.usage = Usage(prompt_tokens=12, completion_tokens=4)
        await a.on_finish(c, "ok")
    used = 20 * 16
    assert a.quotas.book.level(bucket, 1000) == pytest.approx(1000 - used)  # type: ignore[attr-defined]
    c = ctx(words=10, max_tokens=200)
    await a.apply(c)
    assert c.reservation is not None and c.reservation.tokens == 12 + 4  # not 12 + 200
    # the estimate was wrong: the answer used 100 tokens; the bucket is settled to that
    c.usage = Usage(prompt_tokens=12, completion_tokens=100)
    await a.on_finish(c, "ok")
    assert a.quotas.book.level(bucket, 1000) == pytest.approx(1000 - used - 112)  # type: ignore[attr-defined]
    # KV stays worst case: prompt + the limit
    c = ctx(words=10, max_tokens=200)
    await a.apply(c)
    assert c.reservation is not None and c.reservation.kv_bytes == 14 * 16 * 2048  # 212 tokens
