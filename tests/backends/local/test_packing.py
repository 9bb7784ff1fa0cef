"""bfloat16 projections in oneDNN's packed layout (packing.py) against plain F.linear."""

from __future__ import annotations

import pytest
import torch

from backends.local import packing
from backends.local.loader import load_checkpoint
from backends.local.projection import UPCAST_ROWS, Proj

from .conftest import TinyCheckpoint

pytestmark = pytest.mark.skipif(
    not packing.available(torch.bfloat16, torch.device("cpu")), reason="no oneDNN on this torch"
)


def test_bfloat16_load_packs_and_answers_like_plain_weights(
    tiny_checkpoint: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed = load_checkpoint(tiny_checkpoint.model_dir, dtype="bfloat16")
    projs = [m for m in packed.model.modules() if type(m) is Proj]
    assert packed.packed == len(projs) > 0
    assert all(p.weight.numel() == 0 for p in projs)  # one copy only
    for layer in packed.model.layers:  # q, k, v and gate, up: one weight each; the rest alone
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.fused is not None and mlp.fused is not None
        assert attn.fused.projs == [attn.q_proj, attn.k_proj, attn.v_proj]
        assert attn.fused.sizes == [p.out_features for p in attn.fused.projs]
        assert all(p.group is attn.fused and p.packed is None for p in attn.fused.projs)
        assert all(p.group is mlp.fused and p.packed is None for p in mlp.fused.projs)
        assert attn.o_proj.packed is not None and mlp.down_proj.packed is not None
    monkeypatch.setattr(packing, "available", lambda dtype, device: False)
    plain = load_checkpoint(tiny_checkpoint.model_dir, dtype="bfloat16")
    assert plain.packed == 0 and plain.weight_bytes == packed.weight_bytes
    g = torch.Generator().manual_seed(0)
    for rows in (17, UPCAST_ROWS // 2 + 3):  # 34 rows: the packed kernel; 2 x 131: upcast
        ids = torch.randint(0, plain.config.vocab_size, (2, rows), generator=g)
        with torch.inference_mode():
            a, b = packed.model.forward_full(ids), plain.model.forward_full(ids)
        assert (a - b).abs().max().item() < 0.05
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


def test_float32_and_int8_are_never_packed(tiny_checkpoint: TinyCheckpoint) -> None:
    assert load_checkpoint(tiny_checkpoint.model_dir).packed == 0
    assert load_checkpoint(tiny_checkpoint.model_dir, dtype="bfloat16", quantize="int8").packed == 0
