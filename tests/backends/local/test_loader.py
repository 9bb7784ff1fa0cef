"""The mmap loader: parity through save_pretrained, page-cache backing, shards, dtypes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from backends.local.loader import CheckpointError, load_checkpoint, map_safetensors

from .conftest import TinyCheckpoint
from .helpers import mapped_ranges


def test_loaded_model_matches_transformers_and_is_mmapped(tiny_checkpoint: TinyCheckpoint) -> None:
    loaded = load_checkpoint(tiny_checkpoint.model_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_checkpoint.model_dir)).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (2, 30))
    with torch.no_grad():
        diff = (hf(ids).logits - loaded.model.forward_full(ids)).abs().max().item()
    assert diff < 1e-4
    path = os.path.realpath(tiny_checkpoint.model_dir / "model.safetensors")
    ranges = mapped_ranges(path)
    assert ranges, "model.safetensors is not mapped"
    for name, t in loaded.model.state_dict().items():
        assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), f"{name} is not mmap-backed"
    assert loaded.copied_bytes == 0
    expected = sum(p.numel() * 4 for p in hf.state_dict().values())
    assert loaded.weight_bytes == expected


def test_sharded_checkpoint_with_index(tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    src = map_safetensors(tiny_checkpoint.model_dir / "model.safetensors")
    names = sorted(src.tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: src.tensors[n].clone() for n in part}, str(tmp_path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(tiny_checkpoint.hf_config))
    sharded = load_checkpoint(tmp_path)
    whole = load_checkpoint(tiny_checkpoint.model_dir)
    ids = torch.randint(0, whole.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(sharded.model.forward_full(ids), whole.model.forward_full(ids))
    assert len(sharded.files) == 2


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_reads_dtypes_exactly(tmp_path: Path, file_dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 10).to(file_dtype)
    save_file({"x": t, "y": torch.arange(7, dtype=torch.float32)}, str(tmp_path / "a.safetensors"))
    mf = map_safetensors(tmp_path / "a.safetensors")
    assert mf.tensors["x"].dtype == file_dtype and torch.equal(mf.tensors["x"], t)
    assert torch.equal(mf.tensors["y"], torch.arange(7, dtype=torch.float32))


def test_dtype_conversion_copies_only_when_needed(tiny_checkpoint: TinyCheckpoint) -> None:
    loaded = load_checkpoint(tiny_checkpoint.model_dir, dtype="bfloat16")
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.copied_bytes == loaded.weight_bytes
    with torch.no_grad():
        out = loaded.model.forward_full(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_errors_are_clear(tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_checkpoint.hf_config))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_checkpoint(tmp_path)
    bad = {**tiny_checkpoint.hf_config, "hidden_size": 32, "head_dim": 8}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    os.symlink(tiny_checkpoint.model_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_checkpoint(tiny_checkpoint.model_dir, dtype="float8")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="too short"):
        map_safetensors(tmp_path / "junk.safetensors")
