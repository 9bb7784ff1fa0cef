"""Load a Hugging Face checkpoint directory with its safetensors weights memory-mapped.

The safetensors header (8-byte little-endian length, then JSON) is parsed here; each file is
mapped once with ``mmap.ACCESS_COPY`` and every tensor is a ``torch.frombuffer`` view into the
mapping, so weights live in the page cache (shared between processes) and are never copied onto
the heap unless a dtype conversion is asked for.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backends.hf import safetensors
from backends.hf.config import ArchConfig
from backends.local import memory_plan, packing
from backends.local.model import Llama
from backends.local.quantize import quantize_state, swap_quantized

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANTIZE_MODES = ("none", "int8")


class CheckpointError(ValueError):
    """The checkpoint directory is missing something or is malformed."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise CheckpointError(
            f"unsupported dtype {name!r}; expected one of {', '.join(TORCH_DTYPES)}"
        ) from None


@dataclass
class MappedFile:
    """One safetensors file mapped into memory; tensors are views into `mapping`."""

    path: Path
    mapping: mmap.mmap
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file."""
    try:
        return safetensors.read_header(path)
    except safetensors.SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def map_safetensors(path: Path) -> MappedFile:
    start, header = read_header(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    mf = MappedFile(path, mapping, metadata=header.pop("__metadata__", None) or {})
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dt!r}")
        dtype = SAFETENSORS_DTYPES[dt]
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(s) for s in info["shape"]]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * itemsize or start + end > size:
            raise CheckpointError(f"{path}: tensor {name} offsets do not match its shape")
        if count == 0:
            mf.tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = start + begin
        if offset % itemsize:  # misaligned: a copy is the only safe view
            raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=offset)
            t = raw.clone().view(dtype)
        else:
            t = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
        mf.tensors[name] = t.view(shape)
    return mf


def checkpoint_files(model_dir: Path) -> list[Path]:
    try:
        return safetensors.checkpoint_files(model_dir)
    except safetensors.SafetensorsError as e:
        raise CheckpointError(str(e)) from None


@dataclass
class LoadedModel:
    model: Llama
    config: ArchConfig
    weight_bytes: int
    files: list[MappedFile]
    copied_bytes: int = 0  # bytes that had to be converted onto the heap
    quantized: bool = False  # int8 weights (from the checkpoint or quantized at load)
    packed: int = 0  # projections served from oneDNN-packed bfloat16 weights (packing.py)


def read_config(model_dir: Path) -> ArchConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json")
    raw = json.loads(path.read_text())
    method = (raw.get("quantization_config") or {}).get("quant_method")
    if method not in (None, memory_plan.QUANT_METHOD):
        raise CheckpointError(
            f"{model_dir}: quant_method {method!r} is not supported (only "
            f"{memory_plan.QUANT_METHOD!r}, written by `gateway quantize`)"
        )
    return ArchConfig.from_hf(raw)


def load_checkpoint(
    model_dir: str | Path, dtype: str = "float32", device: str = "cpu", quantize: str = "none"
) -> LoadedModel:
    """Build the model on `meta` and assign mmapped weights (converted only where needed).

    int8 tensors with a `_scale` companion (a `gateway quantize` checkpoint) stay int8 and
    mmapped; `quantize="int8"` quantizes a float checkpoint here instead (onto the heap).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if quantize not in QUANTIZE_MODES:
        raise CheckpointError(f"quantize={quantize!r}; expected one of {QUANTIZE_MODES}")
    cfg = read_config(model_dir)
    target = parse_dtype(dtype)
    files = [map_safetensors(p) for p in checkpoint_files(model_dir)]
    tensors = {name: t for mf in files for name, t in mf.tensors.items()}
    origin = {name: mf.path for mf in files for name in mf.tensors}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    copied = 0
    if quantize == "int8":
        orig = tensors
        tensors = quantize_state(orig)
        copied += sum(
            t.numel() * t.element_size() for n, t in tensors.items() if orig.get(n) is not t
        )
    int8 = {
        n
        for n, t in tensors.items()
        if t.dtype == torch.int8 and n + memory_plan.SCALE_SUFFIX in tensors
    }
    with torch.device("meta"):
        model = Llama(cfg)
    try:
        swap_quantized(model, int8)
    except (AttributeError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot use int8 weights: {e}") from None
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise CheckpointError(f"{origin.get(name, model_dir)}: unexpected tensor {name}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{name}: shape {tuple(t.shape)} in checkpoint, model expects "
                f"{tuple(expected[name].shape)}"
            )
        want = t.dtype if t.dtype == torch.int8 else target
        if t.dtype != want or device != "cpu":
            t = t.to(device=device, dtype=want)
            copied += t.numel() * t.element_size()
        state[name] = t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensors {', '.join(missing[:5])}...")
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    packed = packing.pack(model)  # bfloat16 on CPU: oneDNN's blocked layout, packed once
    return LoadedModel(model, cfg, weight_bytes, files, copied, quantized=bool(int8), packed=packed)
