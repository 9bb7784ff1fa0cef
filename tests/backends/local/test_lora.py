"""PEFT adapters: parity with peft, mixed-adapter batches, validation, bytes."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers

from backends.hf.safetensors import adapter_bytes
from backends.local import packing
from backends.local.loader import load_checkpoint
from backends.local.lora import AdapterConfig, AdapterError, install, load_adapter, uninstall
from backends.local.projection import STACK_SETS, UPCAST_ROWS, Proj

from .conftest import TinyCheckpoint, add_lora, random_hf_model
from .helpers import prefill_logits


def test_lora_matches_peft_in_a_mixed_batch(tiny_checkpoint: TinyCheckpoint) -> None:
    loaded = load_checkpoint(tiny_checkpoint.model_dir)
    adapter = load_adapter(tiny_checkpoint.adapters_dir / "acme", loaded.model)
    install(loaded.model, adapter, slot=3)
    base = transformers.LlamaForCausalLM.from_pretrained(str(tiny_checkpoint.model_dir)).eval()
    with torch.no_grad():
        ref_base = base(torch.tensor([list(range(5, 25))])).logits[0]
    pm = peft.PeftModel.from_pretrained(base, str(tiny_checkpoint.adapters_dir / "acme")).eval()
    ids = list(range(5, 25))
    with torch.no_grad():
        ref_lora = pm(torch.tensor([ids])).logits[0]
    assert (ref_lora - ref_base).abs().max().item() > 1e-2, "adapter must change the output"
    out = prefill_logits(loaded.model, [ids, ids, ids], [3, 0, 3])
    assert (out[0] - ref_lora).abs().max().item() < 1e-4
    assert (out[1] - ref_base).abs().max().item() < 1e-4
    assert (out[2] - ref_lora).abs().max().item() < 1e-4
    uninstall(loaded.model, 3)
    out = prefill_logits(loaded.model, [ids], [3])
    assert (out[0] - ref_base).abs().max().item() < 1e-4


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("length", [24, UPCAST_ROWS // 3 + 1])
def test_bfloat16_adapters_match_peft_on_fused_projections(tmp_path: Path, length: int) -> None:
    """bfloat16 packs [q; k; v] and [gate; up] as one weight each (packing.py) and applies the
    members' adapters together (`Fused`), in float32 as peft keeps them by default
    (autocast_adapter_dtype): a batch mixing an adapter on every projection, one on some
    members only, and the base model answers like peft on the same bfloat16 model. Three
    prompts of 24 tokens run the packed bfloat16 kernel; of 86, a step of 258 rows, the
    float32 upcast (`UPCAST_ROWS`). Both round the base output to bfloat16 before adding the
    float32 deltas, as peft does: adding them before the cast instead moved the logits 0.36-0.45
    from peft's (tolerance 0.42-0.47) and no nearer float32's."""
    shape = {"hidden_size": 128, "intermediate_size": 256}
    random_hf_model(97, seed=5, **shape).save_pretrained(str(tmp_path / "m"))
    add_lora(random_hf_model(97, seed=5, **shape), tmp_path / "all", r=8, seed=7,
             targets=ALL_PROJECTIONS)
    add_lora(random_hf_model(97, seed=5, **shape), tmp_path / "some", r=4, seed=8,
             targets=("k_proj", "up_proj", "o_proj"))
    ids = [(7 * i + 3) % 97 for i in range(length)]

    def reference(adapter: str | None) -> torch.Tensor:
        model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, str(tmp_path / adapter))
            lora_a = model.base_model.model.model.layers[0].self_attn.o_proj.lora_A["default"]
            assert lora_a.weight.dtype == torch.float32  # peft's default: adapters upcast
        with torch.no_grad():
            return model.eval()(torch.tensor([ids])).logits[0].float()

    refs = {name: reference(name) for name in ("all", "some", None)}
    assert (refs["all"] - refs[None]).abs().max().item() > 0.1, "adapters must change the output"
    assert (refs["some"] - refs[None]).abs().max().item() > 0.1

    loaded = load_checkpoint(tmp_path / "m", dtype="bfloat16")
    if packing.available(torch.bfloat16, torch.device("cpu")):
        assert all(layer.self_attn.fused and layer.mlp.fused for layer in loaded.model.layers)
    for slot, name in ((2, "all"), (5, "some")):
        adapter = load_adapter(tmp_path / name, loaded.model)
        assert {t.dtype for ab in adapter.weights.values() for t in ab} == {torch.float32}
        assert adapter.nbytes == adapter_bytes(tmp_path / name, 4)
        install(loaded.model, adapter, slot)

    def check(slots: list[int], names: list[str | None]) -> None:
        out = prefill_logits(loaded.model, [ids] * len(slots), slots)
        for ours, name in zip(out, names, strict=True):
            theirs = refs[name]
            assert (ours - theirs).abs().max().item() < 0.05 * theirs.abs().max().item()
            assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9

    check([2, 0, 5], ["all", None, "some"])
    uninstall(loaded.model, 2)  # the fused stacks follow: slot 2 is the base model now
    check([2, 5], [None, "some"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_stacks_are_bounded_and_counted(tiny_checkpoint: TinyCheckpoint, dtype: str) -> None:
    """Every adapter set a step mixes gets its concatenated stacks; a projection (or a fused
    group) keeps those of the last STACK_SETS sets only, and their bytes are reported."""
    loaded = load_checkpoint(tiny_checkpoint.model_dir, dtype=dtype)
    model = loaded.model
    adapter = load_adapter(tiny_checkpoint.adapters_dir / "acme", model)
    for slot in range(1, 7):
        install(model, adapter, slot)
    assert model.lora_stack_bytes() == 0
    ids = list(range(5, 15))
    want = prefill_logits(model, [ids], [1])[0]
    for first in range(1, 7):  # six different sets of two adapters
        out = prefill_logits(model, [ids, ids], [first, first % 6 + 1])
        assert (out[0] - want).abs().max().item() < 0.05  # the same adapter in every slot
    holders = [m.stacks.sets for m in model.modules() if isinstance(m, Proj)]
    holders += [g.fused.stacks.sets for layer in model.layers for g in (layer.self_attn, layer.mlp)
                if g.fused is not None]
    assert max(len(h) for h in holders) == STACK_SETS
    two = 2 * adapter.nbytes  # a set of two: each stack holds both adapters' A and B once
    assert STACK_SETS * two * 0.9 <= model.lora_stack_bytes() <= STACK_SETS * two
    uninstall(model, 1)
    assert model.lora_stack_bytes() == 0  # a change drops the stacks built before it


def test_rslora_scale_and_bytes(tmp_path: Path) -> None:
    hf = random_hf_model(61)
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    ref_base = hf(torch.tensor([[1, 2, 3, 4]])).logits[0].detach()
    pm = add_lora(hf, tmp_path / "rs", r=8, use_rslora=True)
    with torch.no_grad():
        ref = pm(torch.tensor([[1, 2, 3, 4]])).logits[0]
    assert (ref - ref_base).abs().max().item() > 1e-3
    from backends.hf.config import ArchConfig
    from backends.local.model import Llama

    ours = Llama(ArchConfig.from_hf(hf.config.to_dict()))
    ours.load_state_dict(base_state)
    adapter = load_adapter(tmp_path / "rs", ours)
    assert adapter.config.scale == pytest.approx(16 / 8**0.5)
    # r x (d_in + d_out) x 4 bytes per module: q (64+64), v (64+32), o (64+64), down (128+64) per layer
    assert adapter.nbytes == 8 * 4 * 2 * ((64 + 64) + (64 + 32) + (64 + 64) + (128 + 64))
    install(ours, adapter, 1)
    out = prefill_logits(ours.eval(), [[1, 2, 3, 4]], [1])
    assert (out[0] - ref).abs().max().item() < 1e-4


def test_adapter_for_another_base_model_is_rejected(
    tmp_path: Path, tiny_checkpoint: TinyCheckpoint
) -> None:
    other = random_hf_model(61, hidden_size=32, intermediate_size=64, head_dim=8)
    add_lora(other, tmp_path / "other")
    loaded = load_checkpoint(tiny_checkpoint.model_dir)
    with pytest.raises(AdapterError, match="different base model"):
        load_adapter(tmp_path / "other", loaded.model)


def test_adapter_config_validation(tmp_path: Path) -> None:
    assert (
        AdapterConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).scale
        == 2.0
    )
    with pytest.raises(AdapterError, match="DoRA"):
        AdapterConfig.from_dict({"r": 4, "use_dora": True})
    with pytest.raises(AdapterError, match="integer r"):
        AdapterConfig.from_dict({"lora_alpha": 8})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
        load_adapter(tmp_path, torch.nn.Module())  # type: ignore[arg-type]
