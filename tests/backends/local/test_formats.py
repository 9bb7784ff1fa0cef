"""Weight formats: the int8 kernel's fidelity, weights held once, and a ledger whose
weight components name every copy so that `other` stays small for every format."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from backends.hf.config import ArchConfig
from backends.local.backend import LocalBackend, LocalConfig
from backends.local.commands import demo
from backends.local.commands.demo import _save_tensors
from backends.local.commands.mid_model import MID_SHAPE, SEED
from backends.local.commands.quantize import quantize_checkpoint
from backends.local.loader import load_checkpoint
from backends.local.memory_plan import format_rows, plan_for_config, render_formats
from backends.local.model import Llama
from gateway.core.procmem import read_process_memory

from .helpers import mapped_ranges
from .test_backend import PROMPTS, collect, ctx_for

# A read fault on a mapped file also maps the page-cache pages around it (fault-around, 64 KiB
# by default), so a page given back may come back beside a live neighbour: a few pages of slack
FAULT_AROUND = 4 * 65536


def _trajectories(model: Llama, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Float32's greedy continuations (the teacher-forced inputs), one forward per token."""
    out = []
    with torch.inference_mode():
        for ids in prompts:
            seq = list(ids)
            for _ in range(n):
                seq.append(int(model.forward_full(torch.tensor([seq]))[0, -1].argmax()))
            out.append(seq)
    return out


def _agreement(ref: Llama, other: Llama, seqs: list[list[int]]) -> tuple[float, float, float]:
    """Teacher-forced argmax agreement under the engine tests' margin rule: counted where
    float32's top-2 margin exceeds twice the difference between the two models' logits. For a
    lossy format the difference is its mean |logit difference| (the worst one would make
    agreement certain by construction). Returns (agreement on those, their share, agreement
    over every position)."""
    eq, margins, diffs = [], [], []
    with torch.inference_mode():
        for seq in seqs:
            ids = torch.tensor([seq])
            a, b = ref.forward_full(ids)[0].float(), other.forward_full(ids)[0].float()
            top2 = a.topk(2, dim=-1).values
            eq.append(a.argmax(-1) == b.argmax(-1))
            margins.append(top2[:, 0] - top2[:, 1])
            diffs.append((a - b).abs().flatten())
    same, margin = torch.cat(eq), torch.cat(margins)
    sure = margin > 2 * torch.cat(diffs).mean()
    return (
        float(same[sure].float().mean()) if bool(sure.any()) else 0.0,
        float(sure.float().mean()),
        float(same.float().mean()),
    )


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The mid model's shape and weights (`mid_model.py`: seeded, std 0.02) with the demo's
    tokenizer and vocabulary, written here."""
    out = tmp_path_factory.mktemp("mid") / "mid"
    out.mkdir()
    cfg = ArchConfig.from_hf({**MID_SHAPE, "vocab_size": demo.VOCAB_SIZE})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Llama(cfg)
    _save_tensors(out / "model.safetensors", model.state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((demo_model / name).read_bytes())
    (out / "config.json").write_text(json.dumps({**cfg.to_hf(), "pad_token_id": demo.PAD_ID}))
    return out


@pytest.mark.parametrize("which", ["demo", "mid"])
def test_int8_kernel_agrees_with_float32(which: str, demo_model: Path, mid_model: Path) -> None:
    """int8 weights through the CPU kernel (bfloat16 activations), quantized at load and from a
    `gateway quantize` checkpoint, against the float32 model: >= 0.95 teacher-forced agreement."""
    path = demo_model if which == "demo" else mid_model
    ref = load_checkpoint(path)
    at_load = load_checkpoint(path, "bfloat16", quantize="int8")
    assert at_load.kernels.get("int8pack", 0) > 0, at_load.kernels  # the real kernel ran
    prompts = [[1, 5, 9, 17, 33], [2, 40, 41, 42], [7, 100, 3, 9, 27, 11]]
    seqs = _trajectories(ref.model, prompts, 24 if which == "demo" else 12)
    agree, share, overall = _agreement(ref.model, at_load.model, seqs)
    assert share >= 0.6 and agree >= 0.95, (agree, share, overall)
    if which == "demo":  # a trained model's margins are wide: every position agrees
        assert overall >= 0.95, overall


def test_int8_checkpoint_is_aligned_mapped_and_equals_quantizing_at_load(
    demo_model: Path, tmp_path: Path
) -> None:
    """`gateway quantize` writes every int8 matrix 64-byte aligned, so the kernel reads the shared
    mapping itself (no private copy); its outputs equal quantizing at load."""
    dst = quantize_checkpoint(demo_model, tmp_path / "q8")
    q8 = load_checkpoint(dst, "bfloat16")
    at_load = load_checkpoint(demo_model, "bfloat16", quantize="int8")
    int8 = [p for p in q8.model.parameters() if p.dtype == torch.int8]
    assert int8 and all(p.data_ptr() % 64 == 0 for p in int8)
    ranges = mapped_ranges(str((dst / "model.safetensors").resolve()))
    assert all(any(a <= p.data_ptr() < b for a, b in ranges) for p in int8)
    assert q8.mapped_bytes == sum(p.numel() for p in int8)  # the int8 matrices stay mapped
    assert (q8.source_resident_bytes() or 0) <= FAULT_AROUND
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41]])
    with torch.inference_mode():
        assert torch.equal(q8.model.forward_full(ids), at_load.model.forward_full(ids))


def _bf16_checkpoint(src: Path, dst: Path) -> Path:
    """A bfloat16 copy of `src` (as real checkpoints ship) with its tokenizer."""
    dst.mkdir()
    loaded = load_checkpoint(src)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.model.state_dict().items()}
    _save_tensors(dst / "model.safetensors", state)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_converted_weights_give_their_mapped_pages_back(mid_model: Path, tmp_path: Path) -> None:
    """A bfloat16 checkpoint packed for oneDNN, and int8 quantized at load from it: the mapped
    source pages go as soon as the copy exists, measured from the kernel's page table."""
    bf16 = _bf16_checkpoint(mid_model, tmp_path / "bf16")
    for quantize in ("none", "int8"):
        loaded = load_checkpoint(bf16, "bfloat16", quantize=quantize)
        assert loaded.heap_bytes > 0.9 * loaded.weight_bytes  # packed / quantized copies
        assert (loaded.source_resident_bytes() or 0) <= FAULT_AROUND
        pages = [mf.resident_pages() for mf in loaded.files]
        assert all(p is not None for p in pages)
        resident = sum(int(p.sum()) * 4096 for p in pages if p is not None)
        # what stays resident is what is served from the mapping (its tensors' edge pages)
        assert resident <= loaded.mapped_bytes + 2 * 4096 * len(loaded.live_mapped())


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8 checkpoint", "int8 at load"])
def test_ledger_names_every_weight_copy(fmt: str, mid_model: Path, tmp_path: Path) -> None:
    """For each format on a model loaded here: the weight components are disjoint (mapped pages +
    heap copies = the plan's weights), no source page is left resident, and `other` (RSS less
    every named component) is at most 3% of RSS."""
    bf16 = _bf16_checkpoint(mid_model, tmp_path / "bf16")
    model, dtype, quantize = {
        "float32": (mid_model, "float32", "none"),
        "bfloat16": (bf16, "bfloat16", "none"),
        "int8 checkpoint": (quantize_checkpoint(bf16, tmp_path / "q8"), "bfloat16", "none"),
        "int8 at load": (bf16, "bfloat16", "int8"),
    }[fmt]
    cfg = LocalConfig(
        model=str(model), dtype=dtype, quantize=quantize, kv_cache_bytes=16 << 20, max_batch_size=8
    )
    plan = plan_for_config(cfg)

    async def live() -> None:
        b = LocalBackend("small", cfg)
        await b.start()
        try:
            ctxs = [ctx_for(p, max_tokens=8) for p in PROMPTS]
            await asyncio.gather(*(collect(b, c) for c in ctxs))  # a burst after the warm-up
            mem = b.memory()
            assert mem.measured is not None and mem.other is not None
            assert mem.weights + mem.weights_heap == plan.weights
            if fmt in ("float32", "int8 checkpoint"):  # served from the mapped file
                assert mem.weights > 0.99 * plan.weights
            else:
                assert mem.weights_heap > 0.9 * plan.weights  # the copies (embeddings stay mapped)
            # no source page kept: at most the kernel's fault-around (64 KiB) next to live ones
            assert mem.weights_source <= FAULT_AROUND, mem
            rss = read_process_memory().rss
            assert rss is not None
            assert abs(mem.other) <= 0.03 * rss, mem
        finally:
            await b.aclose()

    asyncio.run(live())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_int8_runs_a_kernel_and_follows_float32(demo_model: Path) -> None:
    """On CUDA the int8 matrices take a real kernel (`_weight_int8pack_mm` where torch has it on
    CUDA, else `torch._int_mm`), not dequantize + GEMM, and agree with the CPU's float32 model."""
    ref = load_checkpoint(demo_model)
    gpu = load_checkpoint(demo_model, "bfloat16", "cuda", "int8")
    assert sum(n for k, n in gpu.kernels.items() if k != "dequant") > 0, gpu.kernels
    seqs = _trajectories(ref.model, [[1, 5, 9, 17, 33], [2, 40, 41, 42]], 16)
    with torch.inference_mode():
        for seq in seqs:
            a = ref.model.forward_full(torch.tensor([seq]))[0]
            b = gpu.model.forward_full(torch.tensor([seq], device="cuda"))[0].float().cpu()
            assert bool(torch.isfinite(b).all())
            assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.95


def test_plan_shows_formats_side_by_side(demo_model: Path, tmp_path: Path) -> None:
    """`gateway plan`'s formats, from headers only: bytes as the loader counts them, and where
    each format's weights live (mapped and shared, or private heap copies)."""
    rows = {r.name: r for r in format_rows(demo_model, 8 << 20, 16)}
    assert list(rows) == ["float32", "bfloat16", "int8 at load", "int8 checkpoint"]
    assert rows["float32"].weights == load_checkpoint(demo_model).weight_bytes
    assert (
        rows["int8 at load"].weights
        == load_checkpoint(demo_model, "bfloat16", quantize="int8").weight_bytes
    )
    assert rows["float32"].where == rows["int8 checkpoint"].where == "mapped (shared)"
    assert rows["bfloat16"].where == rows["int8 at load"].where == "heap (private)"
    assert rows["bfloat16"].kv_capacity_tokens == 2 * rows["float32"].kv_capacity_tokens
    q8 = quantize_checkpoint(demo_model, tmp_path / "q8")
    only = format_rows(q8, 8 << 20, 16)
    assert [r.name for r in only] == ["int8 checkpoint"]
    assert only[0].weights == load_checkpoint(q8, "bfloat16").weight_bytes
    assert "int8 checkpoint" in render_formats(only)


def test_big_demo_shape() -> None:
    """`gateway demo-model --size big`'s shape: 360M parameters, Qwen2 layout, tied (built on
    meta here; `make big-model` writes it)."""
    from backends.local.commands.big_model import BIG_SHAPE

    cfg = ArchConfig.from_hf(BIG_SHAPE)
    assert cfg.attention_bias and not cfg.attention_out_bias and cfg.tie_word_embeddings
    with torch.device("meta"):
        model = Llama(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 355e6 < params < 365e6, params
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    ) == (896, 24, 14, 2, 4864)
