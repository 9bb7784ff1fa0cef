from __future__ import annotations

import asyncio

import pytest

from backends.remote_adapters import RemoteAdapters
from gateway.core.errors import BackendError


class FakeServer:
    """Records loads/unloads; a load takes a little time so requests overlap."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.loaded: set[str] = set()
        self.calls: list[str] = []
        self.fail = fail or set()
        self.peak_bytes = 0

    async def load(self, name: str) -> None:
        self.calls.append(f"load {name}")
        await asyncio.sleep(0.01)
        if name in self.fail:
            raise BackendError(f"cannot load {name}", 502, "adapter_load_failed")
        self.loaded.add(name)
        self.peak_bytes = max(self.peak_bytes, 100 * len(self.loaded))

    async def unload(self, name: str) -> None:
        self.calls.append(f"unload {name}")
        self.loaded.discard(name)


def manager(server: FakeServer, budget: int = 200) -> RemoteAdapters:
    sizes = {"a": 100, "b": 100, "c": 100, "huge": 1000}
    return RemoteAdapters(budget, server.load, server.unload, sizes.get)


def test_one_load_under_concurrency() -> None:
    async def run() -> None:
        s = FakeServer()
        m = manager(s)
        await asyncio.gather(*(m.acquire("a") for _ in range(20)))
        assert s.calls == ["load a"]
        assert m.loads == 1
        for _ in range(20):
            await m.release("a")

    asyncio.run(run())


def test_lru_unpinned_is_evicted_and_budget_holds() -> None:
    async def run() -> None:
        s = FakeServer()
        m = manager(s)
        for name in ("a", "b"):
            await m.acquire(name)
            await m.release(name)
        await m.acquire("a")  # a is now most recent
        await m.release("a")
        await m.acquire("c")  # evicts b, the least recently used
        assert s.loaded == {"a", "c"}
        assert "unload b" in s.calls and m.evictions == 1
        assert s.peak_bytes <= 200

    asyncio.run(run())


def test_pinned_adapters_are_never_evicted() -> None:
    async def run() -> None:
        s = FakeServer()
        m = manager(s)
        await m.acquire("a")
        await m.acquire("b")
        waiter = asyncio.create_task(m.acquire("c"))
        await asyncio.sleep(0.05)
        assert not waiter.done() and s.loaded == {"a", "b"}  # both in use: c waits
        await m.release("a")
        await asyncio.wait_for(waiter, 1)
        assert s.loaded == {"b", "c"}
        assert s.peak_bytes <= 200

    asyncio.run(run())


def test_unknown_and_oversized_adapters() -> None:
    async def run() -> None:
        m = manager(FakeServer())
        with pytest.raises(BackendError) as info:
            await m.acquire("nope")
        assert info.value.status == 404
        with pytest.raises(BackendError) as info:
            await m.acquire("huge")
        assert info.value.status == 503

    asyncio.run(run())


def test_failed_load_reaches_every_waiter_and_can_be_retried() -> None:
    async def run() -> None:
        s = FakeServer(fail={"a"})
        m = manager(s)
        results = await asyncio.gather(*(m.acquire("a") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, BackendError) for r in results)
        assert m.resident == {} and m.used_bytes == 0
        s.fail.clear()
        await m.acquire("a")
        assert m.resident == {"a": 100}

    asyncio.run(run())
