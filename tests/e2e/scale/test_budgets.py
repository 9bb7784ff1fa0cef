"""A spend budget held exactly across three `gateway serve` processes on one real Redis: 64 concurrent clients of one tenant whose budget fits 40 requests at the model's
price; the usage records' costs sum to at most the budget (and to exactly what Redis
charged), every refusal is `budget_exceeded`, a replayed settle and a SIGKILLed gateway
charge nothing twice, and the period rolls over on an injected clock. Counts and sums only."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.core.config import Budget
from policies import redis_scripts
from policies.budget import NANO, BudgetExceeded, Budgets, nanos, period_bounds
from policies.redis_client import RedisClient
from policies.redis_quotas import RedisQuotas, SharedStateConfig
from tests.e2e.scale.conftest import gateways, wait_for
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.redis_server import RedisServer
from tests.server import ACME_SHA, GLOBEX_SHA

KEY, GLOBEX = "sk-demo-acme", "sk-demo-globex"
# the counting upstream answers 5 prompt + 2 completion tokens: 0.0005 + 0.02 = 0.0205 each
PRICE = {"input_per_1m": 100.0, "output_per_1m": 10000.0}
COST = 0.0205
AMOUNT = 40 * COST  # 0.82: forty answers
PREFIX = "bud:"


def config(upstream: str, redis_url: str, lease_ttl_s: float) -> dict[str, Any]:
    return {
        "server": {
            "admin_api_key_env": "GATEWAY_ADMIN_KEY",
            "shutdown_grace_s": 3,
            "usage_log": "usage.jsonl",
        },
        "backends": {"gpu": {"kind": "openai", "url": upstream, "read_timeout": 120, "retries": 0}},
        "models": [{"name": "large", "backend": "gpu", "price": PRICE}],
        "tenants": [
            {
                "name": "acme",
                "api_key_sha256": [ACME_SHA],
                "models": ["large"],
                "limits": {"budget": {"amount": AMOUNT, "period": "month"}},
            },
            {
                "name": "globex",
                "api_key_sha256": [GLOBEX_SHA],
                "models": ["large"],
                "limits": {"budget": {"amount": 1.0, "period": "day"}},
            },
        ],
        "policy_options": {"admission": {"queue_timeout_s": 60}},
        "shared_state": {
            "redis_url": redis_url,
            "key_prefix": PREFIX,
            "lease_ttl_s": lease_ttl_s,
            "timeout_s": 0.5,
        },
    }


def ask(url: str, key: str = KEY) -> tuple[int, str | None, float]:
    """One chat request (acme's by default): (status, error code, Retry-After)."""
    try:
        r = httpx.post(
            f"{url}/chat/completions",
            timeout=120,
            headers={"authorization": f"Bearer {key}"},
            json={
                "model": "large",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hello there"}],
            },
        )
    except httpx.TransportError:
        return 0, None, 0.0  # the gateway went away (a test killed it)
    code = r.json()["error"]["code"] if r.status_code != 200 else None
    return r.status_code, code, float(r.headers.get("retry-after", 0))


def admin_usage(url: str, tenant: str = "acme") -> dict[str, Any]:
    r = httpx.get(
        url.removesuffix("/v1") + "/admin/usage",
        timeout=10,
        headers={"authorization": "Bearer sk-admin"},
    )
    assert r.status_code == 200, r.text
    budgets: dict[str, Any] = r.json()["budgets"]
    return budgets[tenant]


def records(workdir: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(workdir.glob("gw*/usage*.jsonl*")):
        out += [orjson.loads(line) for line in f.read_bytes().splitlines() if line.strip()]
    return out


def wait_for_records(workdir: Path, n: int) -> list[dict[str, Any]]:
    wait_for(
        lambda: len([r for r in records(workdir) if r["status"] == 200]) >= n,
        f"{n} usage records written",
        timeout=20,
    )
    return records(workdir)


def test_a_budget_holds_exactly_across_three_gateways(
    upstream: CountingUpstream, redis: RedisServer, tmp_path: Path
) -> None:
    cfg = config(upstream.url, redis.url, lease_ttl_s=1.0)
    with gateways(cfg, tmp_path) as gws:
        urls = [url for url, _ in gws]
        upstream.reset_counts()
        # a request may lower its class, never raise it; /admin/usage is the admin's only
        headers = {"authorization": f"Bearer {KEY}", "x-gateway-priority": "high"}
        body = {"model": "large", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(f"{urls[0]}/chat/completions", headers=headers, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "priority_not_allowed"
        r = httpx.get(
            urls[0].removesuffix("/v1") + "/admin/usage",
            timeout=10,
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 401
        statuses: list[tuple[int, str | None, float]] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            """Asks until the budget is spent: a refusal while requests in flight hold the
            room (Retry-After 1) is tried again, one for the period's reset ends it."""
            for _ in range(20):
                status, code, retry = ask(urls[i % 3])
                with lock:
                    statuses.append((status, code, retry))
                if status != 200 and retry > 1:
                    return
                if status != 200:
                    time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        answered = [s for s in statuses if s[0] == 200]
        refused = [s for s in statuses if s[0] != 200]
        assert refused and {(s[0], s[1]) for s in refused} == {(429, "budget_exceeded")}
        assert 35 <= len(answered) <= 40, len(answered)
        recs = wait_for_records(tmp_path, len(answered))
        billed = [r for r in recs if r["status"] == 200]
        assert len(billed) == len(answered) == upstream.received
        total = sum(nanos(r["cost"]) for r in billed)
        assert total <= nanos(AMOUNT)
        # spent to within one worst case (about 26 prompt tokens as estimated + 2: 0.0226)
        assert nanos(AMOUNT) - total < nanos(0.0226)
        # what Redis charged is exactly what the records say: nothing twice, nothing lost
        usage = admin_usage(urls[1])
        assert nanos(usage["spent"]) == total and usage["reserved"] == 0
        assert usage["amount"] == pytest.approx(AMOUNT) and usage["period"] == "month"
        metrics = httpx.get(urls[2].removesuffix("/v1") + "/metrics", timeout=10).text
        assert f'gateway_budget_spent{{tenant="acme",period="month"}} {total / NANO!r}' in metrics

        # a settle replayed (a retry after a lost reply) charges nothing more
        start, end = period_bounds("month", time.time())
        base = f"{PREFIX}budget:acme:{start}"
        asyncio.run(_replay_settles(redis.url, base, end))
        assert nanos(admin_usage(urls[0])["spent"]) == total

        # SIGKILL a gateway with requests in flight: their reservations expire, unbilled
        upstream.hold()
        upstream.reset_counts()
        killed_url, proc = gws[0]
        asks = [
            threading.Thread(target=ask, args=(killed_url, GLOBEX), daemon=True) for _ in range(2)
        ]
        try:
            for t in asks:
                t.start()
            wait_for(lambda: upstream.in_flight == 2, "two globex requests in flight on gw0")
            held = admin_usage(urls[1], "globex")
            assert held["reserved"] > 0 and held["spent"] == 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_for(
                lambda: admin_usage(urls[1], "globex")["reserved"] == 0,
                "the killed gateway's reservations reclaimed",
                timeout=15,
            )
        finally:
            upstream.release()
        assert admin_usage(urls[1], "globex")["spent"] == 0  # nothing billed for them
        assert ask(urls[1], GLOBEX)[0] == 200  # its budget is whole again
        assert nanos(admin_usage(urls[2])["spent"]) == total  # acme's untouched


async def _replay_settles(url: str, base: str, end: int) -> None:
    client = RedisClient(url)
    try:
        settled = await client.call("ZRANGE", f"{base}:settled", 0, -1)
        assert len(settled) >= 35
        for rid in settled[:10]:
            again = await client.script(
                redis_scripts.BUDGET_SETTLE,
                [base, f"{base}:leases", f"{base}:settled"],
                [rid.decode(), 10**9, 3_600_000],
            )
            assert again == 0  # settled already: a no-op
    finally:
        await client.aclose()


def test_the_period_rolls_over_on_an_injected_clock(redis: RedisServer) -> None:
    """The gateways' keys and scripts, driven with a clock at the end of a month and then
    the first minute of the next: the spent month refuses, the new one starts at zero, and
    the old month's keys carry their own expiry."""

    async def run() -> None:
        clock = _Clock(1_798_761_540.0)  # 2026-12-31 23:59 UTC
        state = RedisQuotas(SharedStateConfig(redis_url=redis.url, key_prefix="roll:"))
        await state.start()
        try:
            budgets = Budgets(state, clock)
            budget = Budget(amount=AMOUNT, period="month")
            for _ in range(40):
                c = await budgets.reserve("acme", budget, nanos(COST), nanos(COST))
                await budgets.settle(c, nanos(COST))
            with pytest.raises(BudgetExceeded) as info:
                await budgets.reserve("acme", budget, nanos(COST), nanos(COST))
            assert info.value.headers["x-ratelimit-reset-budget"] == "60"
            old = state.key(f"budget:acme:{period_bounds('month', clock())[0]}")
            assert state._client is not None
            assert 0 < int(await state._client.call("PTTL", old)) <= (60 + 3600) * 1000
            clock.now += 120  # 2027-01-01 00:01 UTC
            c = await budgets.reserve("acme", budget, nanos(COST), nanos(COST))
            report = await budgets.read("acme", budget)
            assert report["spent"] == 0 and report["period_start"] == 1_798_761_600
            await budgets.settle(c, nanos(COST))
        finally:
            await state.aclose()

    asyncio.run(run())


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
