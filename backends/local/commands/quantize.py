"""`gateway quantize SRC DST`: an int8 weight-only copy of a checkpoint, written once offline
(the serving code swaps in the int8 modules at load: backends/local/quantize.py)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from backends.hf.safetensors import checkpoint_files
from backends.local.loader import map_safetensors
from backends.local.memory_plan import QUANT_METHOD
from backends.local.quantize import QuantizeError, quantize_state

ALIGN = 64  # bytes (quantize.ALIGN): where the int8 kernel reads a mapped weight directly
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL"}


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose int8 matrices start at 64-byte offsets: the header is padded
    with spaces (as the format allows) and the int8 tensors whose size is a multiple of 64 go
    first, so the serving kernel reads every one of them from the shared mapping (quantize.py);
    the rest follow by name. Readers need nothing special: offsets are contiguous, no holes."""
    def key(item: tuple[str, torch.Tensor]) -> tuple[int, str]:
        name, t = item
        nbytes = t.numel() * t.element_size()
        return (0 if t.dtype == torch.int8 and nbytes % ALIGN == 0 else 1, name)

    ordered = sorted(tensors.items(), key=key)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, t in ordered:
        if t.dtype not in DTYPE_NAMES:
            raise QuantizeError(f"{name}: dtype {t.dtype} cannot be written")
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in ordered:
            f.write(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def quantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write an int8 copy of checkpoint `src` (tokenizer files and adapters copied) to `dst`."""
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
    save_aligned(quantized, dst / "model.safetensors",
                 {"format": "pt", "quant_method": QUANT_METHOD})
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
