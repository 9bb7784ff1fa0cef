"""Spend budgets: calendar periods, the reservation rule, settlement, and the Redis scripts
(atomic, idempotent per request id, leases that expire, keys that expire) against a real
Redis. Periods roll over on an injected clock: nothing here waits for a day to pass."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import random
from collections.abc import AsyncIterator

import pytest

from gateway.core.config import Budget, Price
from gateway.core.context import Usage
from gateway.core.errors import InvalidRequest, Unavailable
from gateway.settings import ConfigError
from policies.admission import Admission
from policies.budget import NANO, BudgetExceeded, Budgets, Charge, cost_nanos, period_bounds
from policies.redis_quotas import RedisQuotas, SharedStateConfig
from tests.policies.fakes import FakeBackend, ctx, make, settings

_prefixes = itertools.count()
PRICE = Price(input_per_1m=1000.0, output_per_1m=2000.0)  # a token: 0.001 in, 0.002 out


def utc(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> float:
    return float(calendar.timegm((y, m, d, hh, mm, 0)))


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_calendar_periods_in_utc() -> None:
    now = utc(2026, 12, 9, 15, 30)  # a Wednesday
    assert period_bounds("day", now) == (utc(2026, 12, 9), utc(2026, 12, 10))
    assert period_bounds("week", now) == (utc(2026, 12, 7), utc(2026, 12, 14))  # Monday
    assert period_bounds("week", utc(2026, 12, 7)) == (utc(2026, 12, 7), utc(2026, 12, 14))
    assert period_bounds("week", utc(2026, 12, 13, 23, 59)) == (utc(2026, 12, 7), utc(2026, 12, 14))
    assert period_bounds("month", now) == (utc(2026, 12, 1), utc(2027, 1, 1))
    assert period_bounds("month", utc(2028, 2, 29, 23)) == (utc(2028, 2, 1), utc(2028, 3, 1))


async def test_worst_cases_in_flight_never_exceed_the_budget() -> None:
    b = Budgets(clock=WallClock(utc(2026, 12, 9)))
    budget = Budget(amount=10.0, period="day")
    held = [await b.reserve("acme", budget, 1 * NANO, 3 * NANO) for _ in range(3)]  # worst 9
    with pytest.raises(BudgetExceeded) as info:  # 9 + 3 > 10, though only 3 are reserved
        await b.reserve("acme", budget, 1 * NANO, 3 * NANO)
    assert info.value.status == 429 and info.value.code == "budget_exceeded"
    assert info.value.response_headers()["retry-after"] == "1"  # in flight: they settle soon
    assert info.value.headers["x-ratelimit-reset-budget"] == str(86400)
    assert (await b.read("acme", budget))["reserved"] == 3.0
    await b.settle(held[0], 2 * NANO)
    await b.settle(held[0], 2 * NANO)  # a second settle is a no-op
    assert (await b.read("acme", budget))["spent"] == 2.0
    with pytest.raises(BudgetExceeded):  # spent 2 + two in flight at worst 3 each + 3 > 10
        await b.reserve("acme", budget, 1 * NANO, 3 * NANO)
    # spent 2, two in flight with worst 3 each: 8 of 10; one worst case of 2 more fits
    await b.reserve("acme", budget, 1 * NANO, 2 * NANO)


async def test_a_spent_budget_waits_for_the_next_period() -> None:
    clock = WallClock(utc(2026, 12, 9, 23, 0))
    b = Budgets(clock=clock)
    budget = Budget(amount=1.0, period="day")
    c = await b.reserve("acme", budget, NANO // 2, NANO)
    await b.settle(c, NANO)
    with pytest.raises(BudgetExceeded) as info:
        await b.reserve("acme", budget, 1, 1)
    assert info.value.response_headers()["retry-after"] == "3600"  # the reset, not 1 s
    assert info.value.headers["x-ratelimit-reset-budget"] == "3600"
    clock.now = utc(2026, 12, 10, 0, 0)  # midnight UTC: a new period
    c = await b.reserve("acme", budget, NANO // 2, NANO)
    report = await b.read("acme", budget)
    assert report["spent"] == 0 and report["reserved"] == 0.5
    await b.settle(c, 0)


async def test_costs_round_like_usage_records() -> None:
    price = Price(input_per_1m=0.15, output_per_1m=0.6)
    assert cost_nanos(price, 1234, 567) == round(round(price.cost(1234, 567), 9) * NANO)


# ---- admission ----------------------------------------------------------------------------


def admission(budget: dict[str, object], clock: WallClock, **limits: object) -> Admission:
    s = settings(
        [{"name": "acme", "limits": {"budget": budget, **limits}}],
        models=[
            {"name": "large", "backend": "big", "price": PRICE.__dict__},
            {"name": "tiny", "backend": "small", "price": PRICE.__dict__},
        ],
    )
    a = make(Admission, s, {"big": FakeBackend("big", None), "small": FakeBackend("small", None)})
    a.budgets.clock = clock
    return a


async def test_admission_reserves_settles_to_usage_and_refuses_with_the_reset() -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    a = admission({"amount": 1.0, "period": "day"}, clock)
    # 12 prompt tokens (0.012) + at most 100 output tokens (0.2): worst case 0.212
    for _ in range(4):
        c = ctx(words=10, max_tokens=100)
        await a.apply(c)
        c.usage = Usage(prompt_tokens=12, completion_tokens=50)  # 0.012 + 0.1
        await a.on_finish(c, "ok")
    spent = (await a.budgets.read("acme", a.env.tenants["acme"].limits.budget))["spent"]  # type: ignore[arg-type]
    assert spent == pytest.approx(4 * 0.112)
    live = [ctx(words=10, max_tokens=100) for _ in range(2)]
    for c in live:
        await a.apply(c)  # 0.448 + 2 * 0.212 = 0.872
    with pytest.raises(BudgetExceeded) as info:  # + 0.212 > 1
        await a.apply(ctx(words=10, max_tokens=100))
    assert info.value.headers["x-ratelimit-reset-budget"] == str(12 * 3600)
    assert a.reservations.total_reserved() == 0 and a.waiting == 0
    await a.on_finish(live[0], "retried")  # failed over: charged nothing
    await a.on_finish(live[1], "cancelled")  # no usage: keeps its estimate (its limit: no samples)
    report = await a.budgets.read("acme", a.env.tenants["acme"].limits.budget)  # type: ignore[arg-type]
    assert report["spent"] == pytest.approx(4 * 0.112 + 0.212)
    assert report["reserved"] == 0 and report["exposure"] == 0


async def test_shadow_requests_are_never_charged_and_unknown_worst_cases_are_a_400() -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    a = admission({"amount": 0.05, "period": "month"}, clock)
    shadow = ctx(words=10, max_tokens=100)
    shadow.shadow = True
    await a.apply(shadow)  # its worst case is above the budget: a shadow is not charged at all
    shadow.usage = Usage(prompt_tokens=12, completion_tokens=100)
    await a.on_finish(shadow, "ok")
    assert (await a.budgets.read("acme", a.env.tenants["acme"].limits.budget))["spent"] == 0  # type: ignore[arg-type]
    unbounded = ctx(words=10)
    unbounded.sampling.max_tokens = None  # a remote model, no limit named: no worst case
    with pytest.raises(InvalidRequest) as info:
        await a.apply(unbounded)
    assert info.value.code == "max_tokens_required"


def test_a_budgeted_tenant_may_only_use_priced_models() -> None:
    with pytest.raises(ConfigError, match="no price"):
        settings(
            [{"name": "acme", "limits": {"budget": {"amount": 5, "period": "week"}}}],
            models=[
                {"name": "large", "backend": "big", "degrade_to": "tiny", "price": PRICE.__dict__},
                {"name": "tiny", "backend": "small"},
            ],
        )  # reached through degrade_to
    with pytest.raises(ConfigError, match="period"):
        settings([{"name": "acme", "limits": {"budget": {"amount": 5, "period": "year"}}}])


# ---- across processes, in Redis -----------------------------------------------------------


def shared_config(url: str, **kw: object) -> SharedStateConfig:
    return SharedStateConfig(redis_url=url, key_prefix=f"b{next(_prefixes)}:", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def fleet(redis_url: str) -> AsyncIterator[list[RedisQuotas]]:
    cfg = shared_config(redis_url, lease_ttl_s=0.3)
    states = [RedisQuotas(cfg, process_id=f"p{i}") for i in range(3)]
    for s in states:
        await s.start()
    yield states
    for s in states:
        await s.aclose()


async def test_concurrent_reservations_across_processes_hold_the_budget(
    fleet: list[RedisQuotas],
) -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    budgets = [Budgets(s, clock) for s in fleet]
    budget = Budget(amount=4.0, period="day")
    rng = random.Random(29)
    spent_by_answers = [0]
    refused = [0]

    async def client(b: Budgets) -> None:
        for _ in range(6):
            try:
                c = await b.reserve("acme", budget, NANO // 10, NANO // 4)
            except BudgetExceeded:
                refused[0] += 1
                continue
            await asyncio.sleep(0)
            actual = rng.randrange(0, NANO // 4 + 1)
            spent_by_answers[0] += actual
            await b.settle(c, actual)

    await asyncio.gather(*(client(budgets[i % 3]) for i in range(64)))
    report = await budgets[0].read("acme", budget)
    assert report["source"] == "shared"
    assert report["spent"] * NANO == spent_by_answers[0] <= 4 * NANO
    assert report["reserved"] == 0 and report["exposure"] == 0
    assert refused[0] > 0  # 384 requests of up to 0.25 against 4.0


async def test_a_retried_settle_is_charged_once(fleet: list[RedisQuotas]) -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    a, b = Budgets(fleet[0], clock), Budgets(fleet[1], clock)
    budget = Budget(amount=1.0, period="day")
    c = await a.reserve("acme", budget, NANO // 10, NANO // 2)
    await a.settle(c, NANO // 5)
    again = Charge(c.id, c.tenant, c.start, c.end, c.estimate, c.worst)  # e.g. a retried call
    await b.settle(again, NANO // 5)
    assert (await b.read("acme", budget))["spent"] == 0.2


async def test_a_dead_gateways_reservation_expires(fleet: list[RedisQuotas]) -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    dead, alive = Budgets(fleet[0], clock), Budgets(fleet[1], clock)
    budget = Budget(amount=1.0, period="day")
    held = await alive.reserve("acme", budget, NANO // 10, NANO // 2)  # renewed while it runs
    lost = await dead.reserve("acme", budget, NANO // 10, NANO // 2)
    fleet[0].forget(lost.id)  # SIGKILL: no more renewals of its lease, no settle
    with pytest.raises(BudgetExceeded):
        await alive.reserve("acme", budget, NANO // 10, NANO // 2)
    await asyncio.sleep(0.6)  # two lease ttls: the live lease was renewed meanwhile
    c = await alive.reserve("acme", budget, NANO // 10, NANO // 2)
    report = await alive.read("acme", budget)
    assert report["reserved"] == pytest.approx(0.2) and report["spent"] == 0
    await alive.settle(held, 0)
    await alive.settle(c, 0)


async def test_period_keys_roll_over_and_expire_by_themselves(
    fleet: list[RedisQuotas], redis_url: str
) -> None:
    clock = WallClock(utc(2026, 12, 9, 23, 59))
    b = Budgets(fleet[0], clock)
    budget = Budget(amount=1.0, period="day")
    c = await b.reserve("acme", budget, NANO // 2, NANO)
    await b.settle(c, NANO)
    with pytest.raises(BudgetExceeded):
        await b.reserve("acme", budget, 1, 1)
    key = fleet[0].key(f"budget:acme:{int(utc(2026, 12, 9))}")
    assert fleet[0]._client is not None
    ttl_ms = int(await fleet[0]._client.call("PTTL", key))
    assert 60_000 < ttl_ms <= (60 + 3600) * 1000  # the period's last minute plus the margin
    clock.now = utc(2026, 12, 10, 0, 1)
    c = await b.reserve("acme", budget, NANO // 2, NANO)
    assert (await b.read("acme", budget))["spent"] == 0
    await b.settle(c, 0)


async def test_redis_down_applies_on_unavailable(redis_url: str) -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    budget = Budget(amount=1.0, period="day")
    for mode in ("reject", "local_share"):
        s = RedisQuotas(
            shared_config("redis://127.0.0.1:1/0", on_unavailable=mode, timeout_s=0.2),
            local_processes=2,
        )
        s._client = None
        await s.start()
        b = Budgets(s, clock)
        if mode == "reject":
            with pytest.raises(Unavailable):
                await b.reserve("acme", budget, 1, NANO // 4)
        else:  # the budget split between the 2 live processes: 0.5 here
            c = await b.reserve("acme", budget, NANO // 4, NANO // 2)
            with pytest.raises(BudgetExceeded):
                await b.reserve("acme", budget, 1, 1)
            await b.settle(c, NANO // 4)
            assert (await b.read("acme", budget))["spent"] == 0.25
        await s.aclose()


async def test_a_spent_budget_refuses_a_large_request_before_its_prompt_is_counted() -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    a = admission({"amount": 0.25, "period": "day"}, clock)
    big = a.env.backends["big"]
    c = ctx(words=10, max_tokens=100)
    await a.apply(c)
    c.usage = Usage(prompt_tokens=12, completion_tokens=100)  # 0.212 spent, 0.038 left
    await a.on_finish(c, "ok")
    large = ctx(words=20_000, max_tokens=100)  # 100 output tokens cost 0.2 at the least
    large.body_bytes = 200_000
    counted = big.counted
    with pytest.raises(BudgetExceeded) as info:
        await a.gate(large)
    assert big.counted == counted  # refused before counting its prompt
    assert info.value.response_headers()["retry-after"] == str(12 * 3600)
    small = ctx(words=20_000, max_tokens=10)  # 0.02 at the least: may fit, so it is counted
    small.body_bytes = 200_000
    await a.gate(small)
    with pytest.raises(BudgetExceeded):  # its 20,002 prompt tokens do not
        await a.apply(small)
    assert big.counted == counted + 1


async def test_a_reload_keeps_the_budgets_and_fair_share_counters() -> None:
    clock = WallClock(utc(2026, 12, 9, 12))
    old = admission({"amount": 1.0, "period": "day"}, clock)
    c = ctx(words=10, max_tokens=100)
    await old.apply(c)
    new = Admission(old.env, old.cfg)
    new.carry_over(old)
    new.budgets.clock = clock
    c.usage = Usage(prompt_tokens=12, completion_tokens=50)
    await new.on_finish(c, "ok")  # admitted before the reload, settled after it
    budget = new.env.tenants["acme"].limits.budget
    assert budget is not None
    report = await new.budgets.read("acme", budget)
    assert report["spent"] == pytest.approx(0.112) and report["reserved"] == 0
    assert new.fair.counter("acme") == 62


def test_gateway_usage_sums_the_current_calendar_period() -> None:
    from gateway.usage_report import period_since, summarize

    now = utc(2026, 12, 9, 12)
    assert period_since("week", now) == now - utc(2026, 12, 7)
    recs = [
        {"time": utc(2026, 11, 30, 23), "tenant": "acme", "status": 200, "cost": 1.0},
        {"time": utc(2026, 12, 1, 1), "tenant": "acme", "status": 200, "cost": 0.25},
        {"time": utc(2026, 12, 1, 2), "tenant": "acme", "status": 200, "cost": 5.0, "shadow": True},
    ]  # a rollout's shadow copy: nobody's spend
    sums = summarize(iter(recs), ("tenant",), period_since("month", now), now=now)
    assert sums[("acme",)]["cost"] == 0.25 and sums[("acme",)]["requests"] == 1
