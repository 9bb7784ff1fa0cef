"""kv_dtype: int8: the bytes-per-token arithmetic the plan and admission share, the pool
that holds exactly those bytes, and a floor on how close it keeps the model to its float
cache (greedy agreement and logit cosine, teacher-forced: backends/local/commands/kv_quality)."""

from __future__ import annotations

import asyncio
import random

import pytest

from backends.local.backend import LocalBackend
from backends.local.commands.kv_quality import compare
from backends.local.loader import load_checkpoint
from backends.local.memory_plan import plan_checkpoint
from gateway.core.kv import kv_bytes_per_token

from .conftest import TinyCheckpoint
from .test_backend import PROMPTS, collect, ctx_for, run_with, wait_kv_free


def test_bytes_per_token_counts_int8_values_and_scales() -> None:
    assert kv_bytes_per_token(4, 2, 32, 4) == 2048
    assert kv_bytes_per_token(4, 2, 32, 4, "int8") == 2 * 4 * 2 * (32 + 4)  # 576: 0.28x
    assert kv_bytes_per_token(32, 8, 128, 2, "int8") * 1.9 < kv_bytes_per_token(32, 8, 128, 2)
    with pytest.raises(ValueError):
        kv_bytes_per_token(4, 2, 32, 4, "int4")


def test_plan_and_engine_agree_and_answers_hold(tiny_checkpoint: TinyCheckpoint) -> None:
    plan = plan_checkpoint(tiny_checkpoint.model_dir, "float32", 1 << 20, 16, 8, 0,
                           kv_dtype="int8", swap_bytes=4096, kv_admission="estimate")
    text = plan.render()
    assert "kv_dtype int8" in text and "kv swap space" in text and "estimate" in text

    async def body(b: LocalBackend) -> None:
        cap, engine = b.capacity(), b._engine
        assert cap is not None and engine is not None and engine.runner.kv is not None
        assert cap.bytes_per_token == plan.kv.bytes_per_token == 2 * 2 * 2 * (16 + 4)
        assert cap.kv_bytes_total == plan.kv.total_bytes == engine.runner.kv.nbytes
        alone = [await collect(b, ctx_for(p, max_tokens=16)) for p in PROMPTS]
        together = await asyncio.gather(*[collect(b, ctx_for(p, max_tokens=16)) for p in PROMPTS])
        assert [t for t, _ in together] == [t for t, _ in alone]
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body, kv_cache_bytes=1 << 20, kv_dtype="int8")


def test_int8_cache_stays_close_to_the_float_cache(tiny_checkpoint: TinyCheckpoint) -> None:
    model = load_checkpoint(str(tiny_checkpoint.model_dir), "float32", "cpu", "none").model
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(8, 60))] for _ in range(6)]
    q = compare(model, prompts, 24)
    assert q.steps == 6 * 24
    assert q.agreement >= 0.95, q  # measured 0.979 (141 of 144) on this model
    assert q.cosine_mean >= 0.999 and q.cosine_min >= 0.99, q
