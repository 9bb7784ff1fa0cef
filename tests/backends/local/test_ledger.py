"""The memory ledger adds up to measured RSS; chunked prefill keeps greedy outputs exact."""

from __future__ import annotations

import asyncio

from backends.local.backend import LocalBackend

from .conftest import TinyCheckpoint
from .test_backend import PROMPTS, collect, ctx_for, run_with


def test_ledger_explains_rss_after_warm_up(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        await asyncio.gather(
            *[
                collect(b, ctx_for(p * 3, adapter="acme" if i % 2 else None, max_tokens=24))
                for i, p in enumerate(PROMPTS)
            ]
        )
        mem = b.memory()
        assert mem.measured is not None and mem.other is not None
        assert mem.runtime > 0 and mem.workspace > 0 and mem.adapters["acme"] > 0
        assert abs(mem.other) < 0.10 * mem.measured, mem
        engine = b._engine
        assert engine is not None and engine.workspace.peak >= engine.workspace.last > 0
        stacks = engine.model.lora_stack_bytes()  # acme's concatenated stacks, kept per set
        assert stacks > 0 and mem.workspace == engine.workspace.peak + stacks

    run_with(tiny_checkpoint, body, kv_cache_bytes=32 * 1024 * 1024)


def test_chunked_prefill_keeps_greedy_outputs(tiny_checkpoint: TinyCheckpoint) -> None:
    prompts = [p * 4 for p in PROMPTS]
    outputs: dict[int, list[str]] = {}

    def with_budget(budget: int) -> None:
        async def body(b: LocalBackend) -> None:
            res = await asyncio.gather(*[collect(b, ctx_for(p, max_tokens=12)) for p in prompts])
            outputs[budget] = [t for t, _ in res]
            assert b._engine is not None
            steps[budget] = b._engine.steps

        run_with(tiny_checkpoint, body, max_prefill_tokens=budget)

    steps: dict[int, int] = {}
    with_budget(512)
    with_budget(5)
    assert outputs[5] == outputs[512]
    assert steps[5] > steps[512] + 10  # the prompts really were split
