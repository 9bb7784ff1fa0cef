"""`gateway quantize SRC DST`: an int8 weight-only copy of a checkpoint, written once offline
(the serving code swaps in the int8 modules at load: backends/local/quantize.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from backends.hf.safetensors import checkpoint_files
from backends.local.loader import map_safetensors
from backends.local.memory_plan import QUANT_METHOD
from backends.local.quantize import QuantizeError, quantize_state


def quantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write an int8 copy of checkpoint `src` (tokenizer files and adapters copied) to `dst`."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise QuantizeError(f"{src}: no config.json")
    config = json.loads(cfg_path.read_text())
    if config.get("quantization_config"):
        raise QuantizeError(f"{src}: already quantized ({config['quantization_config']})")
    if dst.exists() and any(dst.iterdir()):
        raise QuantizeError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(src):
        state.update(map_safetensors(path).tensors)
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    quantized = quantize_state(state)
    save_file(
        {k: v.contiguous() for k, v in quantized.items()},
        str(dst / "model.safetensors"),
        metadata={"format": "pt", "quant_method": QUANT_METHOD},
    )
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "group": "row"}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in src.iterdir():
        if item.name == "config.json" or item.suffix == ".safetensors":
            continue
        if item.name == "model.safetensors.index.json":
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    return dst
