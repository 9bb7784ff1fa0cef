"""The local engine's memory plan, in plain Python (no torch, nothing loaded): the KV layout,
weight and adapter bytes of a checkpoint, and the plan `gateway plan` prints. The arithmetic
itself is gateway/core/kv.py's, shared with admission and the remote kinds.

Weight bytes come from safetensors headers (8-byte length + JSON), never from the tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.hf.safetensors import (
    SAFETENSORS_FLOATS,
    SafetensorsError,
    adapter_bytes,
    checkpoint_files,
    numel,
    read_header,
    tensor_bytes,
)
from gateway.core.kv import (
    blocks_for,
    dtype_bytes,
    kv_bytes_per_token,
)

CONTEXT_LENGTHS = (512, 2048, 8192, 32768)
QUANT_METHOD = "memgate-int8"
SCALE_SUFFIX = "_scale"


class PlanError(SafetensorsError):
    """A checkpoint or config the plan cannot be computed from (a bad safetensors file is its
    parent class, SafetensorsError: catch that one for both)."""


def is_quantizable(name: str, shape: list[int]) -> bool:
    """Matrices (projections, embeddings, lm_head) get int8; norms and biases stay float."""
    return name.endswith(".weight") and len(shape) == 2


@dataclass(frozen=True)
class KVLayout:
    """The paged KV pool: `num_blocks` blocks of `block_size` tokens."""

    bytes_per_token: int
    block_size: int
    num_blocks: int

    @classmethod
    def from_budget(cls, bytes_per_token: int, block_size: int, budget: int) -> KVLayout:
        if bytes_per_token <= 0 or block_size <= 0:
            raise PlanError("bytes_per_token and block_size must be positive")
        num_blocks = budget // (bytes_per_token * block_size)
        if num_blocks < 1:
            raise PlanError(
                f"kv_cache_bytes={budget} holds no block of {block_size} tokens "
                f"({bytes_per_token * block_size} bytes)"
            )
        return cls(bytes_per_token, block_size, num_blocks)

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def kv_bytes_for(self, tokens: int) -> int:
        return self.blocks_for(tokens) * self.bytes_per_block

    def max_concurrency(self, context_tokens: int) -> int:
        """How many sequences of `context_tokens` (prompt + max_tokens) fit at once."""
        return self.num_blocks // max(self.blocks_for(context_tokens), 1)


# ---- weight bytes -------------------------------------------------------------------------


def weight_bytes(
    model_dir: Path, elem_bytes: int, quantize: str = "none", tied: bool = False
) -> int:
    """Bytes the loaded weights take, from headers only (what `load_checkpoint` reports)."""
    total = 0
    for path in checkpoint_files(model_dir):
        _, header = read_header(path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
                continue
            shape = [int(s) for s in info["shape"]]
            floating = info.get("dtype") in SAFETENSORS_FLOATS
            if quantize == "int8" and floating and is_quantizable(name, shape):
                total += numel(shape) + shape[0] * elem_bytes  # int8 + per-row scale
            else:
                total += tensor_bytes(info, elem_bytes)
    return total


# ---- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunedFrom:
    """What a `gateway prune` checkpoint was cut from, in this plan's dtype and quantization."""

    name: str
    source: str
    layers: tuple[int, int]  # before, after
    ffn: tuple[int, int]
    weights_before: int
    kv_per_token_before: int

    @classmethod
    def from_record(
        cls, record: dict[str, Any], layers: int, ffn: int, kv_per_layer: int, elem: int,
        quantize: str,
    ) -> PrunedFrom:
        src = record["source"]
        matrices = int(src["matrix_params"])
        if quantize == "int8":  # int8 + one float scale per row, as weight_bytes counts
            weights = matrices + int(src["matrix_rows"]) * elem
        else:
            weights = matrices * elem
        return cls(
            name=str(record["name"]),
            source=str(src["name"]),
            layers=(int(src["num_hidden_layers"]), layers),
            ffn=(int(src["intermediate_size"]), ffn),
            weights_before=weights + int(src["other_params"]) * elem,
            kv_per_token_before=kv_per_layer * int(src["num_hidden_layers"]),
        )


def _drop(before: int, after: int) -> str:
    return f"{before:,d} -> {after:,d} B ({(after - before) / before:+.1%})" if before else ""


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv: KVLayout
    context_window: int
    max_batch_size: int
    adapter_budget: int
    adapters: dict[str, int] = field(default_factory=dict)
    pruned: PrunedFrom | None = None
    kv_dtype: str = "auto"  # int8: per-token per-head float32 scales, counted per token
    swap_bytes: int = 0  # host RAM for preempted sequences' KV
    kv_admission: str = "worst_case"

    def concurrency(self) -> dict[int, int]:
        """Largest KV-safe concurrency at each context length (capped at the window)."""
        out: dict[int, int] = {}
        for n in CONTEXT_LENGTHS:
            ctx = min(n, self.context_window)
            out[ctx] = min(self.kv.max_concurrency(ctx), self.max_batch_size)
        return out

    def render(self) -> str:
        mib = 1024 * 1024
        kv = self.kv
        lines = [
            f"weights              {self.weights:>14,d} B  ({self.weights / mib:.1f} MiB)",
            f"kv cache             {kv.total_bytes:>14,d} B  ({kv.num_blocks} blocks x "
            f"{kv.block_size} tokens)",
            f"kv bytes per token   {kv.bytes_per_token:>14,d} B  (kv_dtype {self.kv_dtype})",
            f"kv capacity          {kv.capacity_tokens:>14,d} tokens",
            f"kv swap space        {self.swap_bytes:>14,d} B  (host; "
            f"{self.swap_bytes // kv.bytes_per_block} blocks)",
            f"kv admission         {self.kv_admission:>14}  (reserves prompt + "
            f"{'the estimate' if self.kv_admission == 'estimate' else 'max_tokens'})",
            f"adapter budget       {self.adapter_budget:>14,d} B",
        ]
        for name, nbytes in sorted(self.adapters.items()):
            lines.append(f"  adapter {name:<20} {nbytes:>10,d} B")
        if self.pruned is not None:
            p = self.pruned
            lines += [
                f"pruned from          {p.source} ({p.layers[0]} -> {p.layers[1]} layers, "
                f"FFN {p.ffn[0]} -> {p.ffn[1]})",
                f"  weights            {_drop(p.weights_before, self.weights)}",
                f"  kv bytes per token {_drop(p.kv_per_token_before, kv.bytes_per_token)}",
            ]
        lines.append(f"context window       {self.context_window:>14,d} tokens")
        lines.append(f"max batch size       {self.max_batch_size:>14,d}")
        lines.append("context  kv bytes/request  kv-limited  max concurrency (<= batch size)")
        for ctx, conc in self.concurrency().items():
            lines.append(
                f"{ctx:>7,d}  {kv.kv_bytes_for(ctx):>16,d}  {kv.max_concurrency(ctx):>10,d}  "
                f"{conc:>15,d}"
            )
        return "\n".join(lines)


def plan_checkpoint(
    model_dir: Path,
    dtype: str,
    kv_cache_bytes: int,
    block_size: int,
    max_batch_size: int,
    adapter_cache_bytes: int,
    adapters_dir: Path | None = None,
    quantize: str = "none",
    kv_dtype: str = "auto",
    swap_bytes: int = 0,
    kv_admission: str = "worst_case",
) -> MemoryPlan:
    """The plan for one local backend, reading config.json and safetensors headers only."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise PlanError(f"{model_dir}: no config.json")
    d = json.loads(cfg_path.read_text())
    elem = dtype_bytes(dtype)
    heads = int(d["num_attention_heads"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
    window = int(d.get("max_position_embeddings") or 2048)
    sliding = d.get("sliding_window")
    if sliding and d.get("use_sliding_window", True):
        window = min(window, int(sliding))
    layers = int(d["num_hidden_layers"])
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, elem, kv_dtype)
    tied = bool(d.get("tie_word_embeddings", False))
    record = d.get("memgate_pruned")
    pruned = None
    if isinstance(record, dict):
        try:
            pruned = PrunedFrom.from_record(record, layers, int(d["intermediate_size"]),
                                            per_token // layers, elem, quantize)
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{cfg_path}: malformed memgate_pruned record ({e})") from None
    adapters: dict[str, int] = {}
    if adapters_dir is not None and adapters_dir.is_dir():
        for p in sorted(adapters_dir.iterdir()):
            if (p / "adapter_model.safetensors").exists():
                adapters[p.name] = adapter_bytes(p, max(elem, 4))  # lora_dtype: float32
    return MemoryPlan(
        weights=weight_bytes(model_dir, elem, quantize, tied),
        kv=KVLayout.from_budget(per_token, block_size, kv_cache_bytes),
        context_window=window,
        max_batch_size=max_batch_size,
        adapter_budget=adapter_cache_bytes,
        adapters=adapters,
        pruned=pruned,
        kv_dtype=kv_dtype,
        swap_bytes=swap_bytes,
        kv_admission=kv_admission,
    )


def plan_for_config(cfg: Any) -> MemoryPlan:
    """The plan of a local backend config (`LocalConfig`: model, dtype, kv_cache_bytes, ...)."""
    return plan_checkpoint(
        Path(cfg.model),
        cfg.dtype,
        cfg.kv_cache_bytes,
        cfg.block_size,
        cfg.max_batch_size,
        cfg.adapter_cache_bytes,
        Path(cfg.adapters_dir) if cfg.adapters_dir else None,
        cfg.quantize,
        cfg.kv_dtype,
        cfg.swap_bytes,
        cfg.kv_admission,
    )


# ---- weight formats side by side (`gateway plan`) -----------------------------------------

# (name, dtype, quantize): what a local backend may load one checkpoint as
FORMATS = (("float32", "float32", "none"), ("bfloat16", "bfloat16", "none"),
           ("int8 at load", "bfloat16", "int8"), ("int8 checkpoint", "bfloat16", "none"))


@dataclass(frozen=True)
class FormatRow:
    name: str
    weights: int
    where: str  # "mapped (shared)" | "heap (private)"
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    disk: int  # bytes of the checkpoint files that serve it

    @property
    def resident(self) -> int:
        """Weights + the KV pool (the runtime, measured at start, comes on top)."""
        return self.weights + self.kv_capacity_tokens * self.kv_bytes_per_token


def format_rows(model_dir: Path, kv_cache_bytes: int, block_size: int, device: str = "cpu",
                kv_dtype: str = "auto") -> list[FormatRow]:
    """Each format's weight bytes and where they live, from config.json and headers alone."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise PlanError(f"{model_dir}: no config.json")
    d = json.loads(cfg_path.read_text())
    quantized = bool(d.get("quantization_config"))
    tied = bool(d.get("tie_word_embeddings", False))
    disk_floats: set[str] = set()
    disk = 0
    for path in checkpoint_files(model_dir):
        disk += path.stat().st_size
        _, header = read_header(path)
        header.pop("__metadata__", None)
        disk_floats |= {str(i.get("dtype")) for i in header.values()
                        if i.get("dtype") in SAFETENSORS_FLOATS and len(i["shape"]) == 2}
    heads = int(d["num_attention_heads"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
    layers = int(d["num_hidden_layers"])
    rows = []
    for name, dtype, quantize in FORMATS:
        if quantized and name != "int8 checkpoint":
            continue  # a `gateway quantize` checkpoint loads as int8 only
        elem = dtype_bytes(dtype)
        per_token = kv_bytes_per_token(layers, kv_heads, head_dim, elem, kv_dtype)
        kv = KVLayout.from_budget(per_token, block_size, kv_cache_bytes)
        weights = weight_bytes(model_dir, elem, "int8" if name == "int8 checkpoint" else quantize,
                               tied)
        native = disk_floats <= {{"float32": "F32", "bfloat16": "BF16"}[dtype]}
        packed = dtype == "bfloat16" and device == "cpu" and name == "bfloat16"
        mapped = (name == "int8 checkpoint"
                  or (quantize == "none" and native and not packed and device == "cpu"))
        file_bytes = disk if quantized or name != "int8 checkpoint" else weights
        rows.append(FormatRow(name, weights, "mapped (shared)" if mapped else "heap (private)",
                              per_token, kv.capacity_tokens, file_bytes))
    return rows


def render_formats(rows: list[FormatRow]) -> str:
    mib = 1024 * 1024
    lines = ["formats              weights MiB  held as           KV B/token  KV tokens"
             "  weights+KV MiB  disk MiB"]
    for r in rows:
        lines.append(f"  {r.name:<18} {r.weights / mib:>11.1f}  {r.where:<16} "
                     f"{r.kv_bytes_per_token:>11,d}  {r.kv_capacity_tokens:>9,d}  "
                     f"{r.resident / mib:>14.1f}  {r.disk / mib:>8.1f}")
    lines.append("  (int8 checkpoint: `gateway quantize`, mapped and shared by workers; its disk "
                 "size is estimated until written)")
    return "\n".join(lines)


def plan_formats(cfg: Any) -> str:
    """`gateway plan`'s side-by-side of the formats one local backend config could load."""
    return render_formats(format_rows(Path(cfg.model), cfg.kv_cache_bytes, cfg.block_size,
                                      "cpu" if cfg.device == "cpu" else "cuda", cfg.kv_dtype))
