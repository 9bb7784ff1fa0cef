"""Safetensors headers (8-byte length + JSON), read without loading a tensor: which files a
checkpoint has, what each tensor takes once loaded, what an adapter takes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}
SAFETENSORS_FLOATS = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors checkpoint (or adapter)."""


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} is implausible")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: safetensors header is not an object")
    return 8 + n, header


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        if not files:
            raise SafetensorsError(f"{index}: empty weight_map")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{model_dir}: no *.safetensors files")
    return files


def numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_bytes(info: dict[str, Any], elem_bytes: int) -> int:
    """Bytes one header entry takes once loaded: floats become the serving dtype."""
    dt = str(info.get("dtype"))
    own = SAFETENSORS_BYTES.get(dt)
    if own is None:
        raise SafetensorsError(f"unsupported safetensors dtype {dt!r}")
    return numel(info["shape"]) * (elem_bytes if dt in SAFETENSORS_FLOATS else own)


def adapter_bytes(adapter_dir: Path, elem_bytes: int) -> int:
    """Bytes an installed adapter takes: r x (d_in + d_out) x dtype bytes per module."""
    _, header = read_header(adapter_dir / "adapter_model.safetensors")
    header.pop("__metadata__", None)
    total = 0
    for info in header.values():
        shape = [int(s) for s in info["shape"]]
        if len(shape) != 2:
            raise SafetensorsError(f"{adapter_dir}: LoRA tensors must be matrices")
        total += numel(shape) * elem_bytes  # A [r, in] + B [out, r] = r x (in + out)
    return total
