"""Adapter cache tiers: a mixed batch over more adapters than the cache holds, the ledger."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import transformers

from backends.local.backend import LocalBackend, LocalConfig
from gateway.core.errors import BackendError

from .conftest import TinyCheckpoint, add_lora
from .test_backend import PROMPTS, collect, ctx_for


@pytest.fixture(scope="module")
def three_adapters(
    tiny_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("adapters3")
    shutil.copytree(tiny_checkpoint.adapters_dir / "acme", root / "acme")
    for seed, name in ((2, "beta"), (3, "gamma")):
        base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_checkpoint.model_dir))
        add_lora(base.eval(), root / name, seed=seed)
    return root


def run(ckpt: TinyCheckpoint, adapters: Path, body, **cfg: object) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        b = LocalBackend(
            "small", LocalConfig(model=str(ckpt.model_dir), adapters_dir=str(adapters), **cfg)
        )
        await b.start()
        try:
            await asyncio.wait_for(body(b), 60)
        finally:
            await b.aclose()

    asyncio.run(main())


def test_mixed_batch_over_three_adapters_with_room_for_two(
    tiny_checkpoint: TinyCheckpoint, three_adapters: Path
) -> None:
    cases = [(p, [None, "acme", "beta", "gamma"][i % 4], 10 + i) for i, p in enumerate(PROMPTS * 2)]

    async def alone(b: LocalBackend) -> None:
        out = [await collect(b, ctx_for(p, adapter=a, max_tokens=n)) for p, a, n in cases]
        results.extend(t for t, _ in out)

    results: list[str] = []
    run(tiny_checkpoint, three_adapters, alone)
    assert len({results[i] for i in range(4)}) == 4, "every adapter changes the output"

    async def together(b: LocalBackend) -> None:
        cache = b._adapters
        assert cache is not None
        one = (await b.ensure_adapter("acme")) or cache.sizes()["acme"]
        assert cache.budget_bytes == 2 * one
        out = await asyncio.gather(
            *[collect(b, ctx_for(p, adapter=a, max_tokens=n)) for p, a, n in cases]
        )
        assert [t for t, _ in out] == results
        assert cache.used_bytes <= cache.budget_bytes and len(cache.entries) <= 2
        stats = b.adapter_stats()
        assert stats["evictions"] >= 1 and stats["waits"] >= 1
        assert stats["loads"] == 3 + stats["evictions"] - (3 - len(cache.entries))
        served = stats["hits"] + stats["host_hits"] + stats["loads"] + stats["joined"]
        assert served >= 10  # one ensure + 9 requests with an adapter
        assert all(r.pins == 0 for r in cache.entries.values())
        assert sum(b.memory().adapters.values()) == cache.used_bytes

    size = _adapter_bytes(tiny_checkpoint, three_adapters)
    run(tiny_checkpoint, three_adapters, together, adapter_cache_bytes=2 * size, max_batch_size=8)


def _adapter_bytes(ckpt: TinyCheckpoint, adapters: Path) -> int:
    from backends.hf.safetensors import adapter_bytes

    return adapter_bytes(adapters / "acme", 4)


def test_slot_pressure_demotes_to_host_and_budget_rejects_oversize(
    tiny_checkpoint: TinyCheckpoint, three_adapters: Path
) -> None:
    size = _adapter_bytes(tiny_checkpoint, three_adapters)

    async def body(b: LocalBackend) -> None:
        cache = b._adapters
        assert cache is not None
        await asyncio.gather(*[b.ensure_adapter("acme") for _ in range(4)])
        assert b.adapter_stats()["loads"] == 1 and b.adapter_stats()["joined"] == 3
        await b.ensure_adapter("beta")
        assert cache.tiers() == {"acme": "host", "beta": "device"}  # one slot: acme demoted
        await b.ensure_adapter("acme")  # from host: no disk read
        stats = b.adapter_stats()
        assert stats["loads"] == 2 and stats["host_hits"] == 1 and stats["demotions"] == 2
        assert b.capacity().resident_adapters == ["acme"]  # type: ignore[union-attr]
        await b.ensure_adapter("gamma")  # over the byte budget: the LRU idle one goes to disk
        assert set(cache.entries) == {"acme", "gamma"} and stats["evictions"] == 0
        assert b.adapter_stats()["evictions"] == 1

    run(tiny_checkpoint, three_adapters, body, adapter_cache_bytes=2 * size, max_loras=1)

    async def tiny_budget(b: LocalBackend) -> None:
        with pytest.raises(BackendError) as e:
            await b.ensure_adapter("acme")
        assert (e.value.status, e.value.code) == (503, "adapter_cache_full")

    run(tiny_checkpoint, three_adapters, tiny_budget, adapter_cache_bytes=size - 1)
