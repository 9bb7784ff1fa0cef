"""The engine on a CUDA device: the same answers as on the CPU, LoRA and int8 included, and a
ledger that agrees with torch.cuda. Skipped where torch sees no CUDA device (CI runs these
through bench/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from backends.local.backend import LocalBackend, LocalConfig
from backends.local.loader import load_checkpoint
from backends.local.lora import install, load_adapter
from backends.local.model import Llama
from gateway.core.context import RequestContext

from .conftest import TinyCheckpoint
from .helpers import prefill_logits
from .test_backend import PROMPTS, collect, ctx_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def greedy_trajectory(model: Llama, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model.forward_full(torch.tensor([out]))[0, -1].argmax()))
    return out


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_cuda_logits_and_argmax_follow_the_cpu(tiny_checkpoint: TinyCheckpoint, quantize: str) -> None:
    """Teacher-forced on the CPU's greedy trajectory: logits within 1e-3, and the argmax equal
    wherever the CPU's top-2 margin exceeds twice the difference (the engine tests' rule)."""
    cpu = load_checkpoint(tiny_checkpoint.model_dir, quantize=quantize)
    gpu = load_checkpoint(tiny_checkpoint.model_dir, quantize=quantize, device="cuda")
    assert gpu.model.device.type == "cuda" and gpu.weight_bytes == cpu.weight_bytes
    ids = greedy_trajectory(cpu.model, [0, 5, 9, 17], 24)
    with torch.inference_mode():
        a = cpu.model.forward_full(torch.tensor([ids]))[0]
        b = gpu.model.forward_full(torch.tensor([ids], device="cuda"))[0].cpu()
    diff = (a - b).abs().max().item()
    assert diff < 1e-3
    top2 = a.topk(2, dim=-1).values
    stable = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert torch.equal(a.argmax(-1)[stable], b.argmax(-1)[stable])


def test_cuda_mixed_adapter_batch(tiny_checkpoint: TinyCheckpoint) -> None:
    cpu = load_checkpoint(tiny_checkpoint.model_dir)
    gpu = load_checkpoint(tiny_checkpoint.model_dir, device="cuda")
    for loaded in (cpu, gpu):
        install(loaded.model, load_adapter(tiny_checkpoint.adapters_dir / "acme", loaded.model), 2)
    ids = list(range(5, 25))
    a = prefill_logits(cpu.model, [ids, ids], [2, 0])
    b = prefill_logits(gpu.model, [ids, ids], [2, 0])
    assert (a - b).abs().max().item() < 1e-3


def test_cuda_backend_serves_and_its_ledger_matches_torch_cuda(tiny_checkpoint: TinyCheckpoint) -> None:
    async def main() -> None:
        cfg = LocalConfig(model=str(tiny_checkpoint.model_dir), device="cuda",
                          adapters_dir=str(tiny_checkpoint.adapters_dir), kv_cache_bytes=16 << 20)
        b = LocalBackend("gpu", cfg)
        await b.start()
        try:
            texts = await asyncio.gather(*[
                collect(b, ctx_for(p, adapter="acme" if i % 2 else None, max_tokens=12))
                for i, p in enumerate(PROMPTS)])
            assert all(last.usage is not None and last.usage.completion_tokens >= 1
                       for _, last in texts)
            mem, cap = b.memory(), b.capacity()
            assert cap is not None and mem.kv_used + mem.kv_free == cap.kv_bytes_total
            allocated = torch.cuda.memory_allocated()
            explained = mem.weights + mem.kv_used + mem.kv_free + sum(mem.adapters.values())
            assert explained <= allocated <= torch.cuda.memory_reserved()
            assert mem.measured is not None and mem.measured >= allocated
            assert mem.other is not None and abs(mem.other) < 0.1 * mem.measured
        finally:
            await b.aclose()

    asyncio.run(main())


def test_cuda_swap_and_int8_keep_greedy_answers(tiny_checkpoint: TinyCheckpoint) -> None:
    """Preempted sequences swap their int8 KV (and scales) out to pinned host memory and back:
    the same answers as alone."""
    block = 16 * 2 * 2 * 2 * (16 + 4)

    async def main() -> None:
        cfg = LocalConfig(model=str(tiny_checkpoint.model_dir), device="cuda",
                          adapters_dir=str(tiny_checkpoint.adapters_dir), kv_cache_bytes=6 * block,
                          swap_bytes=64 * block, kv_dtype="int8", prefix_cache="off")
        b = LocalBackend("gpu", cfg)
        await b.start()
        try:
            def ask(p: str, expected: int | None) -> RequestContext:
                ctx = ctx_for(p, max_tokens=40, ignore_eos=True)
                ctx.expected_tokens = expected
                return ctx

            alone = [await collect(b, ask(p, None)) for p in PROMPTS]
            together = await asyncio.gather(*[collect(b, ask(p, 1)) for p in PROMPTS])
            assert [t for t, _ in together] == [t for t, _ in alone]
            stats = b.stats()
            assert stats.kv_swap_outs and stats.kv_resumes == stats.kv_preemptions
            assert stats.kv_swapped_bytes == 0
        finally:
            await b.aclose()

    asyncio.run(main())
