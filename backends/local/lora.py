"""PEFT LoRA adapters: read, validate against the base model, install into a slot.

Semantics, per adapted projection and per token t whose adapter slot is s:
    y[t] += scale_s * (x[t] @ A_s.T) @ B_s.T,   A_s [r, in], B_s [out, r]
The model applies it from a per-token slot index (`projection.LoraBatch`); slot 0 is the base model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.local.loader import map_safetensors
from backends.local.model import Llama
from backends.local.projection import LoraWeights, Proj, lora_dtype

PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter is missing, malformed, or does not fit the base model."""


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False
    base_model: str | None = None  # base_model_name_or_path: the model it was made for

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"unsupported peft_type {d.get('peft_type')!r}; only LORA")
        if d.get("use_dora"):
            raise AdapterError("DoRA adapters are not supported")
        if d.get("bias", "none") != "none":
            raise AdapterError("adapters that train biases are not supported")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            raise AdapterError("rank_pattern / alpha_pattern are not supported")
        try:
            r = int(d["r"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError("adapter_config.json needs an integer r") from None
        if r <= 0:
            raise AdapterError(f"adapter rank r must be positive, got {r}")
        targets = d.get("target_modules") or ()
        return cls(
            r=r,
            lora_alpha=float(d.get("lora_alpha", r)),
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(d.get("use_rslora", False)),
            base_model=str(d["base_model_name_or_path"]) if d.get("base_model_name_or_path") else None,
        )


@dataclass
class LoraAdapter:
    name: str
    config: AdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r,in], B [out,r])
    digest: str = ""  # of its files: cached KV blocks are keyed by it (a reload never meets stale ones)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ab in self.weights.values() for t in ab)


def _module_name(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A')."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", key)
    if m is None:
        raise AdapterError(f"unsupported adapter tensor {key!r} (only lora_A / lora_B weights)")
    return m.group(1), m.group(2)


def load_adapter(path: str | Path, model: Llama, name: str | None = None) -> LoraAdapter:
    """Read a PEFT adapter directory and check every tensor against `model`'s shapes."""
    d = Path(path)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise AdapterError(f"{d}: needs adapter_config.json and adapter_model.safetensors")
    config = AdapterConfig.from_dict(json.loads(cfg_path.read_text()))
    pruned = model.config.pruned_name
    if pruned is not None and config.base_model != pruned:
        raise AdapterError(
            f"{d}: this model is a pruned checkpoint ({pruned}: fewer layers and FFN channels "
            f"than its source) and the adapter was made for {config.base_model or 'another model'!r};"
            f" an adapter for it must be made for {pruned!r} (base_model_name_or_path)"
        )
    mapped = map_safetensors(weights_path)
    dtype, device = lora_dtype(model.compute_dtype), model.device
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in mapped.tensors.items():
        module, which = _module_name(key)
        parts.setdefault(module, {})[which] = t
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{d}: {module} lacks lora_A or lora_B")
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{d}: module {module} does not exist in the base model") from None
        if not isinstance(target, Proj):
            raise AdapterError(f"{d}: module {module} is not a linear projection")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{d}: {module} has inconsistent lora_A/lora_B ranks")
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
            raise AdapterError(
                f"{d}: {module} expects in={target.in_features} out={target.out_features}, "
                f"adapter has A {tuple(a.shape)} B {tuple(b.shape)}: "
                "the adapter was trained for a different base model"
            )
        weights[module] = (
            a.to(device=device, dtype=dtype, copy=True).contiguous(),
            b.to(device=device, dtype=dtype, copy=True).contiguous(),
        )
    if not weights:
        raise AdapterError(f"{d}: adapter has no LoRA weights")
    digest = hashlib.blake2b(cfg_path.read_bytes(), digest_size=16)
    with open(weights_path, "rb") as f:
        digest.update(hashlib.file_digest(f, "blake2b").digest())
    return LoraAdapter(name or d.name, config, weights, digest.hexdigest())


def install(model: Llama, adapter: LoraAdapter, slot: int) -> None:
    """Make `adapter` answer for tokens whose adapter index is `slot` (slot > 0)."""
    if slot <= 0:
        raise ValueError("slot 0 is the base model")
    for module, (a, b) in adapter.weights.items():
        proj = model.get_submodule(module)
        if not isinstance(proj, Proj):
            raise AdapterError(f"{module} is not a linear projection")
        proj.set_adapter(slot, LoraWeights(a, b, adapter.config.scale))


def uninstall(model: Llama, slot: int) -> None:
    for m in model.modules():
        if isinstance(m, Proj):
            m.drop_adapter(slot)
