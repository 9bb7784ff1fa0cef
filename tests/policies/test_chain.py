"""The chain: configured order, rejection stops it, on_finish always runs; registry; config."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import RateLimited
from gateway.core.kv import kv_bytes_for
from gateway.core.policy import Outcome, passed
from gateway.settings import ConfigError, Settings
from policies.admission import AdmissionConfig
from policies.chain import PolicyChain
from policies.leases import Bucket, LocalBook
from policies.registry import DEFAULT_POLICIES, POLICY_KINDS, build_chain
from policies.reservations import Reservations
from tests.policies.fakes import FakeBackend, FakeClock, ctx, settings


class Recorder:
    def __init__(self, name: str, log: list[str], reject: bool = False) -> None:
        self.name, self.log, self.reject = name, log, reject

    async def apply(self, ctx: RequestContext) -> Decision:
        self.log.append(f"apply {self.name}")
        if self.reject:
            raise RateLimited("slow down", retry_after=3)
        return passed(self.name)

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.log.append(f"finish {self.name} {outcome}")


async def test_reject_stops_the_chain_and_finish_runs_for_all() -> None:
    log: list[str] = []
    chain = PolicyChain([Recorder("a", log), Recorder("b", log, reject=True), Recorder("c", log)],
                        Reservations(FakeClock()))
    c = ctx()
    with pytest.raises(RateLimited):
        await chain.apply(c)
    assert log == ["apply a", "apply b"]
    assert [(d.policy, d.action, d.status) for d in c.decisions] == [("a", "pass", 200),
                                                                     ("b", "reject", 429)]
    await chain.finish(c, "rejected")
    assert log[2:] == ["finish c rejected", "finish b rejected", "finish a rejected"]


def test_registry_builds_the_configured_order() -> None:
    def chain_of(s: Settings, backends: dict[str, Any]) -> PolicyChain:
        return build_chain(s.policies, s.policy_options, s.models, s.tenants, backends)

    s = settings(policies=["admission", "adapter_selection"])
    chain = chain_of(s, {"big": FakeBackend("big"), "small": FakeBackend("small")})
    assert [p.name for p in chain.policies] == ["admission", "adapter_selection"]
    assert set(DEFAULT_POLICIES) == set(POLICY_KINDS)
    assert [p.name for p in chain_of(settings(), {}).policies] == list(DEFAULT_POLICIES)
    assert chain_of(settings(policies=[]), {}).policies == ()


@pytest.mark.parametrize(
    ("top", "message"),
    [({"policies": ["admission", "nope"]}, "policies[1]: unknown policy 'nope'"),
     ({"policies": ["admission", "admission"]}, "listed twice"),
     ({"policy_options": {"admission": {"queue_timeout_s": -1}}}, "policy_options.admission"),
     ({"policy_options": {"degrade": {"high_watermark": 2}}}, "policy_options.degrade")],
)
def test_bad_policy_config(top: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings(**top)


@pytest.mark.parametrize(
    ("tenant", "message"),
    [({"trim": {"strategy": "random"}}, "trim.strategy"),
     ({"limits": {"max_kv_share": 1.5}}, "max_kv_share"),
     ({"limits": {"max_concurrency": 0}}, "max_concurrency"),
     ({"allowed_adapters": {"nope": ["x"]}}, "allowed_adapters.nope")],
)
def test_bad_tenant_policy_fields(tenant: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings([{"name": "acme", **tenant}])


def test_kv_arithmetic_is_whole_blocks() -> None:
    assert kv_bytes_for(0, 16, 2048) == 0
    assert kv_bytes_for(1, 16, 2048) == 16 * 2048
    assert kv_bytes_for(16, 16, 2048) == 16 * 2048
    assert kv_bytes_for(17, 16, 2048) == 32 * 2048
    with pytest.raises(ValueError):
        kv_bytes_for(1, 0, 2048)


def test_rate_bucket_refills_to_its_size() -> None:
    clock = FakeClock()
    book = LocalBook(clock)
    assert book.take([Bucket("b", 60, 61)]) == float("inf")
    assert book.take([Bucket("b", 60, 60)]) == 0
    assert book.take([Bucket("b", 60, 1)]) == pytest.approx(1.0)
    clock.now += 1000
    assert book.level("b", 60) == 60
    assert book.level("b", 30) == 30  # a lowered limit applies at the next check


def test_drain_rate_and_wait_estimate() -> None:
    clock = FakeClock()
    book = Reservations(clock, drain_window_s=10)
    from gateway.core.context import Reservation

    book.pool("b", 100)
    r = Reservation("b", "t", 80)
    book.reserve(r)
    assert book.drain_rate("b") is None and book.wait_estimate("b", 40) is None
    assert book.wait_estimate("b", 20) == 0
    with pytest.raises(ValueError):
        book.reserve(Reservation("b", "t", 30))
    clock.now += 4
    book.release(r)
    book.reserve(Reservation("b", "t", 90))
    assert book.drain_rate("b") == pytest.approx(80 / 4)
    assert book.wait_estimate("b", 30) == pytest.approx(20 / 20)
    clock.now += 20
    assert book.drain_rate("b") is None  # the window forgot it


def test_demo_config_enables_the_default_chain() -> None:
    from pathlib import Path

    from gateway.settings import load_settings

    s = load_settings(Path(__file__).resolve().parents[2] / "examples" / "demo.yaml")
    assert s.policies == DEFAULT_POLICIES
    tenants = {t.name: t for t in s.tenants}
    assert tenants["acme"].priority == "high" and tenants["globex"].trim.strategy == "middle_out"
    assert tenants["globex"].limits.max_kv_share == 0.5
    assert s.policy_options["admission"] == AdmissionConfig(queue_timeout_s=10)


async def test_a_large_request_past_its_limit_is_refused_before_it_is_counted() -> None:
    """DESIGN, third wave: limits before expensive work. A large body (past the inline size)
    takes its request and a provisional charge of its bytes in admission's gate, before
    context_trim counts a token; a tenant out of requests gets its 429 with nothing counted.
    A served one is settled to the exact charge (prompt + max_tokens): the bucket holds the
    same as for a small request charged once."""
    from gateway.core.cpu import INLINE_BYTES

    tenant = {"name": "acme", "limits": {"requests_per_minute": 2, "tokens_per_minute": 10**6}}
    backends = {"big": FakeBackend("big", kv_bytes=None, window=100_000),
                "small": FakeBackend("small")}
    clock = FakeClock()
    chain = build_chain(["context_trim", "admission"], {}, settings([tenant]).models,
                        settings([tenant]).tenants, backends, clock=clock)
    admission = chain.get("admission")
    quotas = admission.quotas  # type: ignore[union-attr]
    words = 5000

    def big() -> RequestContext:
        c = ctx(words=words, max_tokens=16)
        c.body_bytes = INLINE_BYTES + 1
        return c

    first = big()
    await chain.apply(first)
    assert backends["big"].counted == 1 and first.precharged_tokens is None
    assert first.prompt_tokens == words + 2
    await asyncio.sleep(0)  # the give-back of the bytes charged over the count is a task
    left = quotas.book._level(Bucket("rate:acme:tokens", 10**6, 0), clock())  # type: ignore[attr-defined]
    assert 10**6 - left == words + 2 + 16  # settled: prompt + max_tokens, not the bytes
    await chain.finish(first, "cancelled")
    await chain.apply(big())
    with pytest.raises(RateLimited):
        await chain.apply(refused := big())
    assert backends["big"].counted == 2  # the third was never counted
    assert refused.decisions[-1].policy == "admission" and refused.prompt_tokens is None
