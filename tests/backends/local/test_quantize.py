"""int8 weight-only quantization: bytes, fidelity, mmapped loading, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backends.local.loader import CheckpointError, load_checkpoint
from backends.local.quantize import QuantizeError, quantize_tensor
from gateway.cli import main as cli_main

from .conftest import TinyCheckpoint
from .helpers import mapped_ranges


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model.forward_full(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_quantize_tensor_per_row() -> None:
    w = torch.randn(16, 64) * torch.linspace(0.01, 10, 16)[:, None]  # rows of very different scale
    q, s = quantize_tensor(w)
    assert q.dtype == torch.int8 and s.shape == (16,)
    assert q.abs().amax(dim=1).eq(127).all()  # every row uses the full range
    err = ((q.float() * s[:, None]) - w).abs().amax(dim=1)
    assert (err <= s / 2 + 1e-6).all()


def test_quantized_checkpoint_bytes_fidelity_and_mmap(
    tiny_checkpoint: TinyCheckpoint, tmp_path: Path
) -> None:
    dst = tmp_path / "q8"
    assert cli_main(["quantize", str(tiny_checkpoint.model_dir), str(dst)]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "memgate-int8"
    assert (dst / "tokenizer.json").exists()
    fp, q8 = load_checkpoint(tiny_checkpoint.model_dir), load_checkpoint(dst)
    assert q8.quantized and q8.copied_bytes == 0
    assert q8.weight_bytes <= 0.3 * fp.weight_bytes
    w = q8.model.model.layers[0].self_attn.q_proj.weight
    lo, hi = w.data_ptr(), w.data_ptr() + w.numel()
    ranges = mapped_ranges(str((dst / "model.safetensors").resolve()))
    assert any(a <= lo and hi <= b for a, b in ranges), "int8 weights must stay mmapped"

    torch.manual_seed(0)
    ids = torch.randint(2, 300, (4, 48))
    with torch.inference_mode():
        a, b = fp.model.forward_full(ids), q8.model.forward_full(ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cos.min().item() > 0.99
    agree = sum(
        x == y
        for p in ([5, 6, 7], [40, 41], [100, 3, 9, 27])
        for x, y in zip(greedy(fp.model, p, 16), greedy(q8.model, p, 16), strict=True)
    )
    assert agree / 48 >= 0.8

    at_load = load_checkpoint(tiny_checkpoint.model_dir, quantize="int8")
    assert at_load.weight_bytes == q8.weight_bytes and at_load.copied_bytes > 0
    with torch.inference_mode():
        assert torch.equal(at_load.model.forward_full(ids), b)

    assert cli_main(["quantize", str(dst), str(tmp_path / "again")]) == 2  # already int8
    with pytest.raises(QuantizeError, match="not empty"):
        from backends.local.commands.quantize import quantize_checkpoint

        quantize_checkpoint(tiny_checkpoint.model_dir, dst)
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gptq"):
        load_checkpoint(dst)
