"""`gateway prune`: importance-chosen layers and FFN channels; the pruned checkpoint loads,
serves, shows its smaller plan, and refuses adapters not made for it."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch

from backends.local.backend import LocalBackend, LocalConfig
from backends.local.commands.prune import Importance, PruneError, choose, prune_checkpoint
from backends.local.loader import load_checkpoint
from backends.local.lora import AdapterError, load_adapter
from backends.local.memory_plan import plan_for_config
from gateway.cli import main as cli_main
from gateway.core.errors import BackendError

from ..conftest import TinyCheckpoint, random_hf_model
from ..test_backend import collect, ctx_for


def test_choose_drops_the_least_important() -> None:
    imp = Importance([0.9, 0.1, 0.5, 0.2], [torch.arange(16.0).flip(0) for _ in range(4)], 64)
    kept, chans = choose(imp, drop_layers=2, ffn_keep=0.5)
    assert kept == [0, 2]
    assert [c.tolist() for c in chans] == [list(range(8))] * 2  # the 8 largest, in order
    with pytest.raises(PruneError, match="drop-layers"):
        choose(imp, drop_layers=4, ffn_keep=0.5)
    with pytest.raises(PruneError, match="ffn-keep"):
        choose(imp, drop_layers=1, ffn_keep=0.0)


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint (2 layers, FFN 128) with an attention-only adapter next to acme
    (which also adapts down_proj), pruned to 1 layer and FFN 64 on a text calibration set."""
    root = tmp_path_factory.mktemp("prune")
    src = root / "src"
    shutil.copytree(tiny_checkpoint.model_dir, src)
    shutil.copytree(tiny_checkpoint.adapters_dir, src / "adapters")
    torch.manual_seed(3)
    hf = random_hf_model(json.loads((src / "config.json").read_text())["vocab_size"])
    hf.load_state_dict(load_checkpoint(src).model.state_dict(), strict=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    peft.get_peft_model(hf, cfg).save_pretrained(str(src / "adapters" / "attn"))
    text = root / "calib.txt"
    text.write_text("\n\n".join(["The quick brown fox jumps over the lazy dog. " * 6,
                                 "A gateway serves many tenants from one shared base model. " * 6]))
    assert cli_main(["prune", str(src), str(root / "dst"), "--drop-layers", "1", "--ffn-keep",
                     "0.5", "--calibration", str(text), "--adapters"]) == 0
    return root / "dst"


def test_pruned_checkpoint_loads_smaller_with_its_record(pruned: Path) -> None:
    raw = json.loads((pruned / "config.json").read_text())
    assert raw["num_hidden_layers"] == 1 and raw["intermediate_size"] == 64
    record = raw["memgate_pruned"]
    assert record["source"]["num_hidden_layers"] == 2 and len(record["dropped_layers"]) == 1
    assert record["calibration_tokens"] > 0
    loaded = load_checkpoint(pruned)
    assert loaded.config.pruned_name == record["name"]
    assert (pruned / "tokenizer.json").exists()
    assert sorted(p.name for p in (pruned / "adapters").iterdir()) == ["attn"]  # acme adapts FFN


def test_plan_shows_the_weight_and_kv_drop(pruned: Path, tiny_checkpoint: TinyCheckpoint) -> None:
    plan = plan_for_config(LocalConfig(model=str(pruned), kv_cache_bytes=1 << 20))
    before = plan_for_config(LocalConfig(model=str(tiny_checkpoint.model_dir), kv_cache_bytes=1 << 20))
    assert plan.pruned is not None
    assert plan.pruned.weights_before == before.weights > plan.weights
    assert plan.pruned.kv_per_token_before == before.kv.bytes_per_token == 2 * plan.kv.bytes_per_token
    text = plan.render()
    assert "pruned from" in text and f"{before.weights:,d} -> {plan.weights:,d} B" in text
    q8 = plan_for_config(LocalConfig(model=str(pruned), kv_cache_bytes=1 << 20, quantize="int8"))
    q8_before = plan_for_config(LocalConfig(model=str(tiny_checkpoint.model_dir),
                                            kv_cache_bytes=1 << 20, quantize="int8"))
    assert q8.pruned is not None and q8.pruned.weights_before == q8_before.weights


def test_pruned_tier_serves_and_refuses_adapters_not_made_for_it(
    pruned: Path, tiny_checkpoint: TinyCheckpoint
) -> None:
    loaded = load_checkpoint(pruned)
    with pytest.raises(AdapterError, match="pruned checkpoint"):
        load_adapter(tiny_checkpoint.adapters_dir / "acme", loaded.model)

    async def main() -> None:
        b = LocalBackend("pruned", LocalConfig(model=str(pruned), adapters_dir=str(
            tiny_checkpoint.adapters_dir), kv_cache_bytes=4 << 20))
        await b.start()
        try:
            _, last = await collect(b, ctx_for("Hello world", max_tokens=8))
            assert last.usage is not None and last.usage.completion_tokens == 8
            with pytest.raises(BackendError) as info:
                await collect(b, ctx_for("Hello world", adapter="acme", max_tokens=4))
            assert info.value.status == 422 and "pruned checkpoint" in str(info.value)
        finally:
            await b.aclose()
        own = LocalBackend("own", LocalConfig(model=str(pruned),
                                              adapters_dir=str(pruned / "adapters")))
        await own.start()
        try:
            base, _ = await collect(own, ctx_for("Hello world", max_tokens=12))
            adapted, _ = await collect(own, ctx_for("Hello world", adapter="attn", max_tokens=12))
            assert adapted != base  # the adapter made for the pruned tier applies
        finally:
            await own.aclose()

    asyncio.run(main())


def test_prune_refuses_what_it_cannot_do(tiny_checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    with pytest.raises(PruneError, match="drop-layers"):
        prune_checkpoint(tiny_checkpoint.model_dir, tmp_path / "a", 2, 1.0, log=lambda _: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(PruneError, match="not empty"):
        prune_checkpoint(tiny_checkpoint.model_dir, tmp_path / "b", 1, 1.0, log=lambda _: None)
