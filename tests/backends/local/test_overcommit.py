"""Overcommit on the real engine: sequences admitted on a (deliberately wrong) estimate are
preempted when the KV cache runs short, swapped out or recomputed, and resumed; their greedy
answers equal their answers alone, with adapters mixed, and nothing is left held."""

from __future__ import annotations

import asyncio

import pytest

from backends.local.backend import LocalBackend, LocalConfig
from gateway.core.context import Chunk, RequestContext
from gateway.core.kv import Lanes

from .conftest import TinyCheckpoint
from .test_backend import PROMPTS, collect, ctx_for, run_with, wait_kv_free

BLOCK_BYTES = 16 * 512  # the tiny model: 512 KV bytes per token, 16-token blocks


def overcommitted(prompt: str, adapter: str | None, expected: int | None,
                  max_tokens: int = 40) -> RequestContext:
    ctx = ctx_for(prompt, adapter=adapter, max_tokens=max_tokens, ignore_eos=True)
    ctx.expected_tokens = expected  # what admission would set: an estimate far too low
    return ctx


INT8_BLOCK_BYTES = 16 * 2 * 2 * 2 * (16 + 4)  # kv_dtype: int8 (values + float32 scales)


@pytest.mark.parametrize(("swap_bytes", "kv_dtype"),
                         [(64 * BLOCK_BYTES, "auto"), (0, "auto"), (64 * BLOCK_BYTES, "int8")],
                         ids=["swap", "recompute", "swap-int8"])
def test_preempted_greedy_answers_equal_their_answers_alone(
    tiny_checkpoint: TinyCheckpoint, swap_bytes: int, kv_dtype: str
) -> None:
    block = INT8_BLOCK_BYTES if kv_dtype == "int8" else BLOCK_BYTES

    async def body(b: LocalBackend) -> None:
        cases = [(p, None if i % 2 else "acme") for i, p in enumerate(PROMPTS)]
        alone = [await collect(b, overcommitted(p, a, None)) for p, a in cases]
        engine = b._engine
        assert engine is not None and engine.scheduler.stats.preemptions == 0
        ctxs = [overcommitted(p, a, 1) for p, a in cases]
        together = await asyncio.gather(*[collect(b, c) for c in ctxs])
        assert [t for t, _ in together] == [t for t, _ in alone]
        def counts(runs: list[tuple[str, Chunk]]) -> list[tuple[int, int]]:
            return [(c.usage.prompt_tokens, c.usage.completion_tokens) for _, c in runs if c.usage]

        assert counts(list(together)) == counts(alone) and len(counts(alone)) == len(alone)
        for c in ctxs:  # prompt + the one expected token
            assert c.memory.kv_bytes_reserved == -(-((c.prompt_tokens or 0) + 1) // 16) * block
        stats = b.stats()
        assert stats.kv_preemptions is not None and stats.kv_preemptions > 0
        assert stats.kv_resumes == stats.kv_preemptions  # every preempted one came back
        if swap_bytes:
            assert stats.kv_swap_outs == stats.kv_preemptions and stats.kv_recomputes == 0
        else:
            assert stats.kv_recomputes == stats.kv_preemptions and stats.kv_swap_outs == 0
        assert b.memory().kv_swapped == 0 and engine.scheduler.swap_used == 0
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body, kv_cache_bytes=6 * block, swap_bytes=swap_bytes,
             kv_admission="estimate", max_batch_size=8, kv_dtype=kv_dtype)


def test_worst_case_reserves_the_limit_and_never_preempts(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        ctxs = [overcommitted(p, None, 1) for p in PROMPTS]
        await asyncio.gather(*[collect(b, c) for c in ctxs])
        cap = b.capacity()
        assert cap is not None and cap.kv_admission == "worst_case"
        for c in ctxs:
            total = (c.prompt_tokens or 0) + 40
            assert c.memory.kv_bytes_reserved == -(-total // 16) * BLOCK_BYTES
        assert b.stats().kv_preemptions == 0
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body, kv_cache_bytes=6 * BLOCK_BYTES, swap_bytes=64 * BLOCK_BYTES,
             kv_admission="worst_case")


def test_aborts_while_preempted_free_blocks_and_swap(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        engine = b._engine
        assert engine is not None
        # up to 60 tokens each on 6 blocks: someone sits in swap space most of the run
        tasks = [asyncio.create_task(collect(b, overcommitted(p, None, 1, 60))) for p in PROMPTS]
        for _ in range(2000):  # until someone sits in swap space
            if engine.scheduler.swap_used:
                break
            await asyncio.sleep(0.005)
        assert engine.scheduler.swap_used > 0 and b.memory().kv_swapped > 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_kv_free(b)
        assert engine.scheduler.swap_used == 0 and not engine.scheduler.has_work()

    run_with(tiny_checkpoint, body, kv_cache_bytes=6 * BLOCK_BYTES, swap_bytes=64 * BLOCK_BYTES,
             kv_admission="estimate")


def test_kv_capacity_keys_are_validated() -> None:
    from gateway.settings import ConfigError, build

    cfg = build(LocalConfig, {"model": "m", "kv_admission": "worst_case", "swap_bytes": "8MiB",
                              "kv_dtype": "int8", "prefix_cache": "shared",
                              "lanes": {"short_max_tokens": 256, "short_share": 0.25}}, "b")
    assert cfg.swap_bytes == 8 << 20 and cfg.lanes == Lanes(256, 0.25)
    assert LocalConfig(model="m").kv_admission == "estimate"  # DESIGN's default
    for bad in ({"kv_admission": "optimistic"}, {"swap_bytes": -1}, {"kv_dtype": "int4"},
                {"prefix_cache": "global"}, {"lanes": {"short_share": 1.5}},
                {"lanes": {"short_max_tokens": 0}}):
        with pytest.raises(ConfigError):
            build(LocalConfig, {"model": "m", **bad}, "b")
