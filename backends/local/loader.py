"""Load a Hugging Face checkpoint directory with its safetensors weights memory-mapped.

The safetensors header (8-byte little-endian length, then JSON) is parsed here; each file is
mapped once with ``mmap.ACCESS_COPY`` and every tensor is a ``torch.frombuffer`` view into the
mapping, so weights live in the page cache (shared between processes) and are never copied onto
the heap unless a dtype conversion, int8 quantization at load or packing (packing.py) is asked for.

Weights are held once: a tensor converted, quantized or packed onto the heap gives its source
pages back as soon as it is done (`MappedFile.release`: madvise(MADV_DONTNEED) on the pages the
tensor covers; the file stays mapped, so nothing dangles), so a converted model never holds both
copies, and quantizing at load streams one tensor at a time. `LoadedModel.mapped_bytes` is what is
still served from the mapping, `heap_bytes` the converted copies; `source_resident_bytes()`
measures (from /proc/self/pagemap) the mapping's resident pages that serve nothing, the duplicate
the ledger names `weights_source` and that should stay 0.
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
from backends.local.memory_plan import is_quantizable
from backends.local.model import Llama
from backends.local.quantize import prepare_kernels, quantize_tensor, swap_quantized

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
PAGE = mmap.PAGESIZE


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
    released: int = 0  # bytes of pages given back (MADV_DONTNEED)
    unused: list[tuple[int, int]] | None = None  # page runs serving no weight (release_unused)

    @property
    def address(self) -> int:
        """Where the mapping starts in this process's address space."""
        if len(self.mapping) == 0:
            return 0
        return torch.frombuffer(self.mapping, dtype=torch.uint8, count=1).data_ptr()

    def span(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(start, end) offsets of `t`'s bytes in the mapping; None when it lies elsewhere."""
        if t.numel() == 0 or t.device.type != "cpu" or t.is_mkldnn:
            return None
        base, size = self.address, len(self.mapping)
        start = t.data_ptr() - base
        end = start + t.numel() * t.element_size()
        return (start, end) if start >= 0 and end <= size else None

    def release(self, t: torch.Tensor) -> int:
        """Give back the whole pages under `t`'s bytes (they serve nothing any more): the
        process's resident set drops them, the page cache keeps the file. Returns the bytes."""
        span = self.span(t)
        if span is None:
            return 0
        first = -(-span[0] // PAGE) * PAGE
        last = span[1] // PAGE * PAGE
        if last <= first:
            return 0
        self.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        self.released += last - first
        return last - first

    def resident_pages(self, first: int = 0, count: int | None = None) -> torch.Tensor | None:
        """One bool per page of the mapping (from page `first`, `count` of them, default all):
        resident in this process, from /proc/self/pagemap's present bit."""
        pages = -(-len(self.mapping) // PAGE) - first if count is None else count
        if pages <= 0:
            return None
        try:
            with open("/proc/self/pagemap", "rb") as f:
                f.seek((self.address // PAGE + first) * 8)
                raw = f.read(pages * 8)
        except OSError:
            return None
        if len(raw) != pages * 8:
            return None
        entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        return entries < 0  # bit 63: present in RAM

    def used_pages(self, live: list[torch.Tensor]) -> torch.Tensor:
        """One bool per page of the mapping: some `live` tensor has bytes on it."""
        used = torch.zeros(-(-len(self.mapping) // PAGE), dtype=torch.bool)
        for t in live:
            span = self.span(t)
            if span is not None:
                used[span[0] // PAGE : -(-span[1] // PAGE)] = True
        return used

    def unused_runs(self, live: list[torch.Tensor]) -> list[tuple[int, int]]:
        """[first, end) page runs that no `live` tensor covers."""
        unused = (~self.used_pages(live)).to(torch.int8)
        edges = torch.diff(unused, prepend=unused.new_zeros(1), append=unused.new_zeros(1))
        starts = torch.nonzero(edges == 1).flatten().tolist()
        ends = torch.nonzero(edges == -1).flatten().tolist()
        return list(zip(starts, ends, strict=True))

    def release_unused(self, live: list[torch.Tensor]) -> int:
        """Give back every page no `live` tensor covers (the edges of released tensors too),
        and remember those runs: the weights never change after loading, so the ledger reads
        the page table only there (`source_resident_bytes`)."""
        self.unused = self.unused_runs(live)
        total = 0
        for first, end in self.unused:
            length = min(end * PAGE, len(self.mapping)) - first * PAGE
            self.mapping.madvise(mmap.MADV_DONTNEED, first * PAGE, length)
            total += length
        return total

    def source_resident_bytes(self, live: list[torch.Tensor]) -> int | None:
        """Resident bytes of this mapping's pages that no `live` tensor covers (the runs
        `release_unused` gave back, when it ran: a few reads of the page table, however large
        the checkpoint)."""
        runs = self.unused if self.unused is not None else self.unused_runs(live)
        total = 0
        for first, end in runs:
            present = self.resident_pages(first, end - first)
            if present is None:
                return None
            total += int(present.sum()) * PAGE
        return total


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
    mapped_bytes: int = 0  # weight bytes served from the mapped files (the rest: heap copies)
    kernels: dict[str, int] = field(default_factory=dict)  # int8 modules by kernel (quantize.py)

    @property
    def heap_bytes(self) -> int:
        """Weight bytes held on the heap: converted, quantized at load, or packed copies."""
        return self.weight_bytes - self.mapped_bytes

    def live_mapped(self) -> list[torch.Tensor]:
        """The model's tensors that are views into the mapped files."""
        out = []
        for t in (*self.model.parameters(), *self.model.buffers()):
            if any(mf.span(t) is not None for mf in self.files):
                out.append(t)
        return out

    def source_resident_bytes(self) -> int | None:
        """Resident pages of the mapped files that serve no weight (a duplicate: should be 0
        once loading released what it converted); None where /proc does not say."""
        live = [] if all(mf.unused is not None for mf in self.files) else self.live_mapped()
        total = 0
        for mf in self.files:
            n = mf.source_resident_bytes(live)
            if n is None:
                return None
            total += n
        return total


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
    owner = {name: mf for mf in files for name in mf.tensors}
    tensors = {name: t for mf in files for name, t in mf.tensors.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    at_load = {
        n for n, t in tensors.items()
        if quantize == "int8" and t.is_floating_point() and is_quantizable(n, list(t.shape))
    }
    int8 = at_load | {
        n for n, t in tensors.items()
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
    copied = 0

    def add(name: str, t: torch.Tensor, source: torch.Tensor) -> None:
        """Keep `t` for `name`; a copy gives `source`'s pages back at once (streaming)."""
        nonlocal copied
        state[name] = t
        if t is not source:
            copied += t.numel() * t.element_size()
            owner[name].release(source)

    for name, t in tensors.items():
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"{owner[name].path}: unexpected tensor {name}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{name}: shape {tuple(t.shape)} in checkpoint, model expects "
                f"{tuple(expected[name].shape)}"
            )
        if name in at_load:  # one tensor at a time: its float pages go before the next
            q, scale = quantize_tensor(t)
            add(name, q.to(device), t)
            state[name + memory_plan.SCALE_SUFFIX] = scale.to(device=device, dtype=target)
            copied += scale.numel() * state[name + memory_plan.SCALE_SUFFIX].element_size()
            continue
        if name.endswith(memory_plan.SCALE_SUFFIX) and name.removesuffix(
            memory_plan.SCALE_SUFFIX
        ) in at_load:
            continue
        want = t.dtype if t.dtype == torch.int8 else target
        add(name, t.to(device=device, dtype=want) if t.dtype != want or device != "cpu" else t, t)
        if state[name] is t and not any(mf.span(t) for mf in files):
            copied += t.numel() * t.element_size()  # misaligned in the file: cloned (map_safetensors)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensors {', '.join(missing[:5])}...")
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())

    def release(t: torch.Tensor) -> None:  # a packed weight's plain source, as soon as packed
        for mf in files:
            mf.release(t)

    packed = packing.pack(model, release)  # bfloat16 on CPU: oneDNN's blocked layout, once
    kernels = prepare_kernels(model, release)  # int8: the kernel per shape (quantize.py)
    loaded = LoadedModel(model, cfg, weight_bytes, files, copied, quantized=bool(int8),
                         packed=packed, kernels=kernels)
    live = loaded.live_mapped()
    for mf in files:  # whatever of the files serves nothing (a tied lm_head, page edges, ...)
        mf.release_unused(live)
    loaded.mapped_bytes = sum(t.numel() * t.element_size() for t in live)
    return loaded
