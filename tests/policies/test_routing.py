"""routing / Router: adapter affinity, least loaded, spill-over, rotation, degrade re-routes."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.context import Reservation
from gateway.settings import ConfigError
from policies.degrade import Degrade, DegradeConfig
from policies.routing import Routing
from tests.policies.fakes import SHA, FakeBackend, ctx, make, settings

BLOCK = 16 * 2048


class Flaky(FakeBackend):
    """A replica that can be out of rotation (like an `openai` upstream after failures)."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.up = True

    def available(self) -> bool:
        return self.up


def replicated(spill: int = 4, **backends: FakeBackend) -> tuple[Routing, dict[str, FakeBackend]]:
    s = settings(
        [{"name": "acme", "adapters": {"large": "acme-a"}},
         {"name": "globex", "adapters": {"large": "globex-a"}},
         {"name": "initech", "adapters": {"large": "initech-a"}}],
        backends={"r1": {"kind": "openai", "url": "http://a"},
                  "r2": {"kind": "openai", "url": "http://b"},
                  "small": {"kind": "openai", "url": "http://c"}},
        models=[{"name": "large", "backends": ["r1", "r2"], "degrade_to": "tiny"},
                {"name": "tiny", "backend": "small"}],
        policy_options={"routing": {"spill_inflight": spill}},
    )
    fakes = backends or {"r1": Flaky("r1", kv_bytes=None), "r2": Flaky("r2", kv_bytes=None)}
    fakes.setdefault("small", FakeBackend("small"))
    return make(Routing, s, dict(fakes)), fakes


def request(tenant: str) -> Any:
    c = ctx(tenant)
    c.adapter = {"acme": "acme-a", "globex": "globex-a", "initech": "initech-a"}[tenant]
    return c


async def test_each_adapter_sticks_to_one_replica() -> None:
    p, _ = replicated()
    placed: dict[str, set[str]] = {}
    for _ in range(5):
        for tenant in ("acme", "globex"):
            c = request(tenant)
            await p.apply(c)
            placed.setdefault(tenant, set()).add(c.backend)
            await p.on_finish(c, "ok")
    assert placed == {"acme": {"r1"}, "globex": {"r2"}}  # spread, then sticky
    assert p.env.router is not None and p.env.router.inflight == {"r1": 0, "r2": 0}


async def test_resident_adapter_wins_over_load() -> None:
    r1 = FakeBackend("r1", resident=())
    r2 = FakeBackend("r2", resident=("acme-a",))
    p, _ = replicated(r1=r1, r2=r2)
    busy = request("globex")
    await p.apply(busy)  # globex goes to r1 (least loaded, config order)
    assert busy.backend == "r1"
    c = request("acme")
    await p.apply(c)
    assert c.backend == "r2"  # the replica that reports acme-a resident


async def test_spills_to_the_least_loaded_when_the_holder_is_busy() -> None:
    p, _ = replicated(spill=2)
    held = [request("acme") for _ in range(3)]
    for c in held[:2]:
        await p.apply(c)
    # the first bound acme-a to r1; the second saw r1 at 1 in flight < 0 + 2 and stayed
    assert [c.backend for c in held[:2]] == ["r1", "r1"]
    await p.apply(held[2])
    assert held[2].backend == "r2"  # r1 at 2 >= 0 + 2: spill over


async def test_out_of_rotation_replica_is_skipped_and_affinity_moves() -> None:
    p, fakes = replicated()
    first = request("acme")
    await p.apply(first)
    await p.on_finish(first, "ok")
    assert first.backend == "r1"
    fakes["r1"].up = False  # type: ignore[attr-defined]
    moved = request("acme")
    await p.apply(moved)
    assert moved.backend == "r2"
    await p.on_finish(moved, "ok")
    fakes["r1"].up = True  # type: ignore[attr-defined]
    again = request("acme")
    await p.apply(again)
    assert again.backend == "r2"  # the adapter now lives on r2: no thrash back


async def test_all_out_of_rotation_still_routes() -> None:
    p, fakes = replicated()
    for f in fakes.values():
        f.up = False  # type: ignore[attr-defined]
    c = request("acme")
    await p.apply(c)
    assert c.backend in ("r1", "r2")


async def test_degrade_routes_to_the_smaller_tier_and_releases() -> None:
    p, _ = replicated(r1=FakeBackend("r1"), r2=FakeBackend("r2"))
    d = Degrade(p.env, DegradeConfig())
    c = request("acme")
    await p.apply(c)
    p.env.reservations.pool(c.backend, 64 * 16 * 2048)
    p.env.reservations.reserve(Reservation(c.backend, "other", 63 * BLOCK))
    await d.apply(c)
    assert (c.target_model, c.backend, c.degraded_from) == ("tiny", "small", "large")
    router = p.env.router
    assert router is not None and router.inflight == {"r1": 0, "small": 1}
    await d.on_finish(c, "ok")
    await p.on_finish(c, "ok")
    assert router.inflight == {"r1": 0, "small": 0}


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "m", "backend": "a", "backends": ["a"]}, "not both"),
    ({"name": "m"}, "give backend"),
    ({"name": "m", "backends": ["a", "a"]}, "twice"),
    ({"name": "m", "backends": ["a", "nope"]}, "models[0].backends: no backend named 'nope'"),
])
def test_replica_config_errors_are_clear(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings(backends={"a": {"kind": "openai", "url": "http://a"}}, models=[model],
                 tenants=[{"name": "t", "api_key_sha256": [SHA], "models": ["m"]}])


def test_backends_list_sets_the_first_as_backend() -> None:
    s = settings(backends={"a": {"kind": "openai", "url": "http://a"},
                           "b": {"kind": "openai", "url": "http://b"}},
                 models=[{"name": "m", "backends": ["b", "a"]}, {"name": "n", "backend": "a"}],
                 tenants=[{"name": "t", "api_key_sha256": [SHA], "models": ["m"]}])
    m, n = s.models
    assert (m.backend, m.backends, n.backend, n.backends) == ("b", ("b", "a"), "a", ("a",))
