"""`gateway demo-model DIR --size mid`: the benchmark model's shape, adapters and bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from backends.hf.tokenizer import ChatTokenizer
from backends.local.loader import load_checkpoint
from backends.local.lora import install, load_adapter
from gateway.cli import main

from ..helpers import prefill_logits


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_mid_model_shape_adapters_and_same_bytes(tmp_path: Path) -> None:
    assert main(["demo-model", str(tmp_path / "mid"), "--size", "mid"]) == 0
    loaded = load_checkpoint(tmp_path / "mid")
    c = loaded.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.vocab_size) == (512, 8, 8, 2, 64, 1408, 2048)
    assert sum(p.numel() for p in loaded.model.parameters()) == 24_650_240
    tok = ChatTokenizer.from_dir(tmp_path / "mid")
    assert tok.vocab_size <= c.vocab_size
    names = sorted(p.name for p in (tmp_path / "mid" / "adapters").iterdir())
    assert names == [f"rand-{i}" for i in range(8)]
    ids = tok.encode("How do I get a refund?")
    install(loaded.model, load_adapter(tmp_path / "mid" / "adapters" / "rand-3", loaded.model), 1)
    out = prefill_logits(loaded.model, [ids, ids], [0, 1])
    assert out.shape[-1] == 2048 and (out[0] - out[1]).abs().max().item() > 1e-3
    assert main(["demo-model", str(tmp_path / "again"), "--size", "mid"]) == 0
    assert _digest(tmp_path / "again") == _digest(tmp_path / "mid")
