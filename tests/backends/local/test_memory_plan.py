"""The memory plan (headers only) equals what the live backend reports."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from backends.local.backend import LocalBackend, LocalConfig
from backends.local.loader import load_checkpoint
from backends.local.lora import load_adapter
from backends.local.memory_plan import KVLayout, PlanError, plan_for_config
from gateway.cli import main as cli_main
from gateway.core.kv import adapter_module_bytes, blocks_for

from .conftest import TinyCheckpoint


def test_block_arithmetic() -> None:
    assert [blocks_for(t, 16) for t in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    kv = KVLayout.from_budget(bytes_per_token=512, block_size=16, budget=100 * 16 * 512 + 5)
    assert kv.num_blocks == 100 and kv.capacity_tokens == 1600
    assert kv.kv_bytes_for(17) == 2 * 16 * 512
    assert kv.max_concurrency(512) == 100 // 32
    assert adapter_module_bytes(8, 64, 32, 4) == 8 * 96 * 4
    with pytest.raises(PlanError, match="holds no block"):
        KVLayout.from_budget(512, 16, 100)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_plan_equals_live_backend(tiny_checkpoint: TinyCheckpoint, quantize: str) -> None:
    cfg = LocalConfig(
        model=str(tiny_checkpoint.model_dir),
        adapters_dir=str(tiny_checkpoint.adapters_dir),
        kv_cache_bytes=300_000,
        max_batch_size=64,
        quantize=quantize,
    )
    plan = plan_for_config(cfg)

    async def live() -> None:
        b = LocalBackend("small", cfg)
        await b.start()
        try:
            cap, mem = b.capacity(), b.memory()
            assert cap is not None
            assert plan.kv.total_bytes == cap.kv_bytes_total == mem.kv_free
            assert plan.kv.bytes_per_token == cap.bytes_per_token
            assert plan.kv.block_size == cap.block_size
            assert plan.context_window == cap.context_window
            assert plan.adapter_budget == cap.adapter_budget_bytes
            assert plan.weights == mem.weights + mem.weights_heap  # mapped + heap copies
            assert mem.weights_source <= 4 * 65536  # source pages given back (fault-around slack)
            await b.ensure_adapter(tiny_checkpoint.adapter_name)
            assert b.memory().adapters == {"acme": plan.adapters["acme"]}
        finally:
            await b.aclose()

    asyncio.run(live())
    conc = plan.concurrency()
    assert list(conc) == [256]  # every length capped at the 256-token window
    assert conc[256] == plan.kv.num_blocks // 16


def test_adapter_bytes_formula(tiny_checkpoint: TinyCheckpoint) -> None:
    loaded = load_checkpoint(tiny_checkpoint.model_dir)
    adapter = load_adapter(tiny_checkpoint.adapters_dir / "acme", loaded.model)
    expected = 0
    for module, (a, _b) in adapter.weights.items():
        proj = loaded.model.get_submodule(module)
        expected += adapter_module_bytes(a.shape[0], proj.in_features, proj.out_features, 4)
    assert (
        adapter.nbytes
        == expected
        == plan_for_config(
            LocalConfig(
                model=str(tiny_checkpoint.model_dir), adapters_dir=str(tiny_checkpoint.adapters_dir)
            )
        ).adapters["acme"]
    )


def test_gateway_plan_cli(
    tiny_checkpoint: TinyCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint.model_dir, model)
    (tmp_path / "c.yaml").write_text(
        "backends:\n  small: {kind: local, model: ./m, kv_cache_bytes: 1MiB}\n"
        "models:\n  - {name: demo, backend: small}\n"
    )
    assert cli_main(["plan", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    plan = plan_for_config(LocalConfig(model=str(model), kv_cache_bytes=1024 * 1024))
    assert f"{plan.weights:,d}" in out and f"{plan.kv.capacity_tokens:,d} tokens" in out
    (model / "model.safetensors").write_bytes(b"\x01")
    assert cli_main(["plan", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "too short" in capsys.readouterr().err
