"""The local backend end to end: concurrency, stops, limits, seeds, aborts, adapters, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from backends.local.backend import LocalBackend, LocalConfig
from gateway.core.context import Chunk, RequestContext, SamplingParams
from gateway.core.errors import BackendError

from .conftest import TinyCheckpoint

PROMPTS = ["Hello world", "The quick brown fox", "Memory is", "A gateway serves", "def add(", "Les"]


def ctx_for(
    prompt: str, kind: str = "chat", adapter: str | None = None, **sampling: Any
) -> RequestContext:
    sampling.setdefault("temperature", 0.0)
    body = {k: v for k, v in sampling.items() if k != "ignore_eos" or v}
    return RequestContext(
        request_id="r",
        tenant="t",
        kind=kind,
        requested_model="m",
        target_model="m",
        backend="small",
        sampling=SamplingParams(**sampling),
        body=body,
        adapter=adapter,
        messages=[{"role": "user", "content": prompt}] if kind == "chat" else None,
        prompt=prompt if kind == "completion" else None,
    )


async def collect(backend: LocalBackend, ctx: RequestContext) -> tuple[str, Chunk]:
    parts: list[str] = []
    last = Chunk()
    async for chunk in backend.generate(ctx):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def run_with(
    ckpt: TinyCheckpoint, body: Callable[[LocalBackend], Awaitable[None]], **cfg: Any
) -> None:
    async def main() -> None:
        backend = LocalBackend(
            "small",
            LocalConfig(model=str(ckpt.model_dir), adapters_dir=str(ckpt.adapters_dir), **cfg),
        )
        await backend.start()
        try:
            await asyncio.wait_for(body(backend), 60)
        finally:
            await backend.aclose()

    asyncio.run(main())


async def wait_kv_free(backend: LocalBackend) -> None:
    for _ in range(200):
        cap = backend.capacity()
        if (
            cap is not None
            and cap.kv_bytes_free == cap.kv_bytes_total
            and backend.memory().kv_used == 0
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"KV not freed: {backend.capacity()} {backend.memory()}")


def test_concurrent_greedy_equals_alone_and_mixes_adapters(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        cases = [(p, None if i % 2 else "acme", 12 + 3 * i) for i, p in enumerate(PROMPTS)]
        alone = [await collect(b, ctx_for(p, adapter=a, max_tokens=n)) for p, a, n in cases]
        together = await asyncio.gather(
            *[collect(b, ctx_for(p, adapter=a, max_tokens=n)) for p, a, n in cases]
        )
        assert [t for t, _ in together] == [t for t, _ in alone]
        def counts(runs: list[tuple[str, Chunk]]) -> list[tuple[int, int]]:
            return [(c.usage.prompt_tokens, c.usage.completion_tokens) for _, c in runs if c.usage]

        assert counts(list(together)) == counts(alone) and len(counts(alone)) == len(alone)
        base = await collect(b, ctx_for(PROMPTS[0], max_tokens=12))
        assert base[0] != alone[0][0], "the adapter must change the output"
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body, max_batch_size=4)  # more requests than batch slots


def test_max_tokens_usage_and_memory(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        ctx = ctx_for("Hello world", max_tokens=20)
        _, last = await collect(b, ctx)
        assert last.finish_reason == "length" and last.usage is not None
        assert last.usage.completion_tokens == 20
        assert last.usage.prompt_tokens == b.count_tokens(ctx) == ctx.prompt_tokens
        cap = b.capacity()
        assert cap is not None
        per_block = cap.bytes_per_token * cap.block_size
        total = last.usage.prompt_tokens + 20
        assert ctx.memory.kv_bytes_reserved == -(-total // cap.block_size) * per_block
        assert ctx.memory.kv_bytes_peak == -(-(total - 1) // cap.block_size) * per_block
        assert 0 < ctx.memory.workspace_bytes <= b.memory().workspace  # its share of a step
        comp = await collect(b, ctx_for("The quick", kind="completion", max_tokens=5))
        assert comp[1].usage is not None and comp[1].usage.completion_tokens == 5
        mem = b.memory()
        assert mem.weights > 0 and mem.measured is not None and mem.measured > mem.weights
        assert mem.kv_used == 0 and mem.kv_free == cap.kv_bytes_total

    run_with(tiny_checkpoint, body)


def test_stop_strings(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        full, _ = await collect(b, ctx_for("Hello world", max_tokens=40))
        assert len(full) > 12
        stop = full[8:11]
        expected = full[: full.find(stop)]
        chunks = [
            c async for c in b.generate(ctx_for("Hello world", max_tokens=40, stop=["zzzq", stop]))
        ]
        text = "".join(c.text for c in chunks)
        assert text == expected
        assert chunks[-1].finish_reason == "stop"
        assert all(stop not in c.text for c in chunks)
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_seed_reproducible_amid_other_requests(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        def sampled(seed: int) -> RequestContext:
            return ctx_for("Memory is", temperature=1.0, seed=seed, max_tokens=30)

        alone, _ = await collect(b, sampled(42))
        results = await asyncio.gather(
            collect(b, ctx_for("Hello", max_tokens=25)),
            collect(b, sampled(42)),
            collect(b, ctx_for("Les", temperature=1.0, max_tokens=10)),
            collect(b, sampled(43)),
        )
        assert results[1][0] == alone
        assert results[3][0] != alone

    run_with(tiny_checkpoint, body)


def test_cancel_and_close_free_the_kv_cache(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        cap = b.capacity()
        assert cap is not None
        gen = b.generate(ctx_for("Hello world", max_tokens=200))
        await gen.__anext__()
        assert b.capacity().kv_bytes_free < cap.kv_bytes_total  # type: ignore[union-attr]
        assert b.memory().kv_used > 0
        await gen.aclose()  # the client went away
        await wait_kv_free(b)

        started = asyncio.Event()

        async def consume() -> None:
            async for _ in b.generate(ctx_for("Hello world", max_tokens=200)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_errors_unknown_adapter_and_context_overflow(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        for name in ("nope", "../model", ""):
            with pytest.raises(BackendError) as e:
                await collect(b, ctx_for("Hi", adapter=name, max_tokens=5))
            assert (e.value.status, e.value.code) == (404, "adapter_not_found")
        with pytest.raises(BackendError) as e:
            await b.ensure_adapter("nope")
        assert e.value.status == 404
        with pytest.raises(BackendError) as e:
            await collect(b, ctx_for("Hi", max_tokens=250))  # window is 256
        assert (e.value.status, e.value.code) == (400, "context_length_exceeded")
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_kv_budget_queues_requests_and_rejects_what_never_fits(
    tiny_checkpoint: TinyCheckpoint,
) -> None:
    async def body(b: LocalBackend) -> None:
        cap = b.capacity()
        assert cap is not None and cap.kv_bytes_total == 6 * cap.block_size * cap.bytes_per_token
        # each needs ~3 blocks: at most two run at once, the rest wait for memory
        results = await asyncio.gather(*[collect(b, ctx_for(p, max_tokens=25)) for p in PROMPTS])
        assert all(c.finish_reason in ("length", "stop") for _, c in results)
        with pytest.raises(BackendError) as e:
            await collect(b, ctx_for("Hi", max_tokens=120))
        assert e.value.code == "context_length_exceeded"

    run_with(tiny_checkpoint, body, kv_cache_bytes=6 * 16 * 512)


def test_adapter_loaded_once_and_accounted(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        ctxs = [ctx_for(p, adapter="acme", max_tokens=4) for p in PROMPTS]
        await asyncio.gather(b.ensure_adapter("acme"), *[collect(b, c) for c in ctxs])
        assert b._adapters is not None and b._adapters.loads == 1
        nbytes = b.memory().adapters["acme"]
        assert nbytes > 0 and all(c.memory.adapter_bytes == nbytes for c in ctxs)
        assert all(c.memory.adapter == "acme" for c in ctxs)
        cap = b.capacity()
        assert cap is not None and cap.resident_adapters == ["acme"]

    run_with(tiny_checkpoint, body)


def test_aclose_fails_in_flight_requests(tiny_checkpoint: TinyCheckpoint) -> None:
    async def main() -> None:
        b = LocalBackend("small", LocalConfig(model=str(tiny_checkpoint.model_dir)))
        with pytest.raises(BackendError) as e:
            await collect(b, ctx_for("Hi", max_tokens=5))
        assert e.value.status == 503  # not started
        await b.start()
        assert await b.health()
        gen = b.generate(ctx_for("Hello", max_tokens=200))
        await gen.__anext__()
        await b.aclose()
        with pytest.raises(BackendError) as e:
            async for _ in gen:
                pass
        assert e.value.status == 503
        assert not await b.health()

    asyncio.run(main())


def test_config_validation() -> None:
    assert LocalBackend.Config is LocalConfig
    with pytest.raises(ValueError, match="quantize"):
        LocalConfig(model="x", quantize="int3")
    with pytest.raises(ValueError, match="dtype"):
        LocalConfig(model="x", dtype="float64")


def test_one_sequence_failing_never_stops_the_engine(
    tiny_checkpoint: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.local.sampler import Sampler

    real = Sampler.sample

    def sample(self: Sampler, logits: torch.Tensor) -> int:
        if self.temperature == 0.5:  # the one request this test breaks
            raise RuntimeError("sampling blew up")
        return real(self, logits)

    monkeypatch.setattr(Sampler, "sample", sample)

    async def body(b: LocalBackend) -> None:
        bad = collect(b, ctx_for(PROMPTS[0], temperature=0.5, max_tokens=8))
        good = collect(b, ctx_for(PROMPTS[1], max_tokens=8))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(results[0], BackendError)
        assert not isinstance(results[1], BaseException) and results[1][1].finish_reason
        assert await b.health()
        _, last = await collect(b, ctx_for(PROMPTS[2], max_tokens=4))  # still serving
        assert last.usage is not None and last.usage.completion_tokens == 4
        await wait_kv_free(b)

    run_with(tiny_checkpoint, body)


def test_a_tiny_temperature_samples_like_greedy(tiny_checkpoint: TinyCheckpoint) -> None:
    async def body(b: LocalBackend) -> None:
        greedy, _ = await collect(b, ctx_for(PROMPTS[0], max_tokens=8))
        tiny, _ = await collect(b, ctx_for(PROMPTS[0], temperature=1e-289, max_tokens=8, seed=1))
        assert tiny == greedy  # no NaN from logits / 1e-289, and the engine lives on

    run_with(tiny_checkpoint, body)
