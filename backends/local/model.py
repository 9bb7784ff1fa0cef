"""A Llama-family decoder (Llama, Mistral, Qwen2) whose state_dict keys are Hugging Face's.

Two forwards share every weight:

- ``forward_full(input_ids[B, T])``: plain causal forward from position 0, no cache, differentiable
  (training, parity tests).
- ``forward_step(step, kv)``: the engine's forward. Tokens of several sequences are flattened
  into one ``[N]`` vector with their positions; new keys and values are written at
  ``write_slots`` of a flat, paged KV pool; every sequence that feeds one token is attended in
  one batched call through its padded slot table (``attention.decode_attention``), each
  prefill chunk through its ``kv_slots``. LoRA is applied per token through an adapter index
  (slot 0 = base model), so one step can mix adapters.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from backends.hf.config import ArchConfig
from backends.local.attention import DecodeBatch, decode_attention, prefill_attention, quantize


def rope_inv_freq(cfg: ArchConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32, CPU), with llama3 / linear scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":
        return inv / factor
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos/sin [..., T, 1, D]."""
    return x * cos + _rotate_half(x) * sin


def lora_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype adapters are kept and applied in: float32 for a half-precision model.

    peft does the same by default (`autocast_adapter_dtype`: bfloat16/float16 adapter weights
    upcast to float32, the input cast up, the sum cast back), so outputs stay close to it; and
    on CPU a bfloat16 GEMM of LoRA's shapes (a few rows by rank) costs 2-3x a float32 one
    (`bench/step_ab.py --adapters 8`, README "Engine speed").
    """
    return torch.float32 if compute in (torch.bfloat16, torch.float16) else compute


@dataclass
class LoraWeights:
    """One adapter on one projection: y += scale * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraBatch:
    """Per-token adapter slots of one step (slot 0 = base), with the per-column weights that
    each set of adapters needs computed once per step and shared by every projection."""

    index: torch.Tensor  # [N] adapter slot of each flat token
    slots: list[int]  # the adapter slots present, ascending, without 0
    _weights: dict[tuple[tuple[int, int, float], ...], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_index(cls, index: torch.Tensor) -> LoraBatch | None:
        slots = [int(s) for s in torch.unique(index).tolist() if s != 0]
        return cls(index, slots) if slots else None

    @classmethod
    def from_slots(cls, slots: list[int], device: torch.device) -> LoraBatch | None:
        """Per-token slots as a list; None when every token is on the base model."""
        present = sorted(set(slots) - {0})
        return cls(torch.tensor(slots, dtype=torch.long).to(device), present) if present else None

    def column_weights(self, layout: tuple[tuple[int, int, float], ...], dtype: torch.dtype) -> torch.Tensor:
        """[N, sum r]: scale_i where the column belongs to the token's own adapter i, else 0.

        `layout` lists (slot, rank, scale) in column order of the concatenated adapters.
        """
        w = self._weights.get(layout)
        if w is None:
            col_slot = torch.tensor([s for s, r, _ in layout for _ in range(r)], device=self.index.device)
            col_scale = torch.tensor([c for _, r, c in layout for _ in range(r)], dtype=dtype,
                                     device=self.index.device)
            w = (self.index[:, None] == col_slot[None, :]).to(dtype) * col_scale
            self._weights[layout] = w
        return w


# [A of every member's adapters], each member's [B] (None: none of the set), its rank
# columns, and the (slot, rank, scale) column layout
Stack = tuple[torch.Tensor, list[torch.Tensor | None], list[int], tuple[tuple[int, int, float], ...]]
UPCAST_ROWS = 256  # packed bfloat16 projections of this many rows or more run in float32
STACK_SETS = 4  # adapter sets whose concatenated stacks a projection keeps (oldest dropped)


class Stacks:
    """The concatenated adapters of projections that share an input (one `Proj`, or a `Fused`
    group), for the last `STACK_SETS` slot sets a step mixed. A member's adapter change drops
    them all (`Proj._changed`); one built meanwhile goes into the dropped dict, never reused."""

    def __init__(self, projs: list[Proj]) -> None:
        self.projs = projs
        self.sets: dict[tuple[int, ...], Stack | None] = {}

    def get(self, slots: list[int]) -> Stack | None:
        sets, key = self.sets, tuple(slots)
        if key in sets:
            return sets[key]
        parts = []
        for p in self.projs:
            with p._lock:
                parts.append([(s, p.adapters[s]) for s in slots if s in p.adapters])
        stack = None
        if any(parts):
            layout = tuple((s, int(w.a.shape[0]), float(w.scale)) for part in parts for s, w in part)
            a = torch.cat([w.a for part in parts for _, w in part])
            bs = [torch.cat([w.b for _, w in part], dim=1) if part else None for part in parts]
            ranks = [sum(int(w.a.shape[0]) for _, w in part) for part in parts]
            stack = (a, bs, ranks, layout)
        if len(sets) >= STACK_SETS:
            del sets[next(iter(sets))]  # the oldest set
        sets[key] = stack
        return stack

    def clear(self) -> None:
        self.sets = {}

    @property
    def nbytes(self) -> int:
        tensors = [t for st in list(self.sets.values()) if st is not None for t in (st[0], *st[1])]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def apply_lora(stack: Stack, outs: list[torch.Tensor], x: torch.Tensor, lora: LoraBatch) -> None:
    """outs[m] += scale_i * (x A_i^T) B_i^T in place for member m, i = the token's slot.

    All adapters of the step at once: x @ [A_1; ...; A_n]^T gives every token its rank
    columns for every adapter of every member, the step's column weights keep only its own
    (times its scale), and one more matmul per member with [B_1 ... B_n] adds the delta. The
    stacks are in `lora_dtype` (float32 for a bfloat16 model: x is cast up, the sum cast back).
    """
    a, bs, ranks, layout = stack
    xa = F.linear(x.to(a.dtype), a) * lora.column_weights(layout, a.dtype)
    for out, b, part in zip(outs, bs, torch.split(xa, ranks, -1), strict=True):
        if b is not None:
            out.add_(F.linear(part, b))


class Proj(nn.Module):
    """A linear projection (HF keys `weight`, `bias`) plus adapters by slot, kept out of state.

    Adapters change from the event loop's thread while the engine thread runs forwards: they
    are set and dropped, and read for `Stacks`, under `_lock`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.adapters: dict[int, LoraWeights] = {}
        self.packed: torch.Tensor | None = None  # oneDNN-blocked weight (packing.py)
        self.group: Fused | None = None  # the fused projection its weight is part of (packing.py)
        self.stacks = Stacks([self])
        self._lock = threading.Lock()

    def pack(self, packed: torch.Tensor) -> None:
        """Serve `base` from `packed` (packing.py); the plain weight is dropped."""
        self.packed = packed
        self._drop_weight()

    def fuse(self, group: Fused) -> None:
        """`group` serves its `base` with its siblings' in one GEMM; the plain weight is dropped."""
        self.group = group
        self._drop_weight()

    def _drop_weight(self) -> None:
        self.weight = nn.Parameter(self.weight.new_empty((0, self.in_features)), requires_grad=False)

    def set_adapter(self, slot: int, weights: LoraWeights) -> None:
        with self._lock:
            self.adapters[slot] = weights
            self._changed()

    def drop_adapter(self, slot: int) -> None:
        with self._lock:
            if self.adapters.pop(slot, None) is not None:
                self._changed()

    def _changed(self) -> None:
        """Drop the stacks built from the old adapters (its group's too: no stale copies)."""
        self.stacks.clear()
        if self.group is not None:
            self.group.stacks.clear()

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ weight.T + bias (quantized projections override this one method)."""
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.group is not None:
            raise RuntimeError("this projection is served by its layer's fused projection")
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """y = base(x) + its adapters' deltas (`apply_lora`)."""
        y = self.base(x)
        if lora is not None and self.adapters:
            stack = self.stacks.get(lora.slots)
            if stack is not None:
                apply_lora(stack, [y], x, lora)
        return y


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with W in oneDNN's blocked layout (packing.py)."""
    if x.numel() >= UPCAST_ROWS * x.shape[-1]:  # a prefill chunk: see packing.py
        b32 = None if bias is None else bias.float()
        return F.linear(x.float(), packed.to_dense(torch.float32), b32).to(x.dtype)
    return cast(torch.Tensor, torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], ""))


class Fused:
    """Projections of one input served by one packed GEMM: a layer's [q; k; v] or [gate; up].

    One oneDNN call instead of three (or two) is the gain: at a few rows a bfloat16 call costs
    about as much for a 128-wide output as for a 768-wide one (packing.py). The fused weight is
    the members' only copy. Their adapters share the input too: one x @ [A of every member]^T
    (one cast, one matmul, one column weighting), then each member's own B on its slice.
    """

    def __init__(self, projs: list[Proj], packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.projs, self.packed, self.bias = projs, packed, bias
        self.sizes = [p.out_features for p in projs]
        self.stacks = Stacks(projs)
        for p in projs:
            p.fuse(self)

    def __call__(self, x: torch.Tensor, lora: LoraBatch | None) -> list[torch.Tensor]:
        outs = list(torch.split(packed_linear(x, self.packed, self.bias), self.sizes, -1))
        if lora is not None:
            stack = self.stacks.get(lora.slots)
            if stack is not None:
                apply_lora(stack, outs, x, lora)
        return outs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


@dataclass
class SeqSpan:
    """One sequence in a step: its new tokens are flat rows [start, start+length)."""

    start: int
    length: int
    kv_slots: torch.Tensor  # [context_len] pool slots of positions 0..context_len-1


@dataclass
class StepInput:
    """One step's flat batch. Spans of one token are decoded together (`decode`, built from
    the spans when the caller gives none); longer spans are prefill chunks."""

    input_ids: torch.Tensor  # [N] flat tokens of all sequences
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N] pool slot where each new token's K/V is written
    seqs: list[SeqSpan]
    logits_rows: torch.Tensor  # [S] flat rows whose logits are wanted (last token of each seq)
    lora: LoraBatch | None = None
    decode: DecodeBatch | None = None

    def decode_batch(self) -> DecodeBatch | None:
        if self.decode is None:
            ones = [s for s in self.seqs if s.length == 1]
            if ones:
                self.decode = DecodeBatch.from_slots(
                    [s.start for s in ones], [s.kv_slots for s in ones], self.input_ids.device
                )
        return self.decode

    @property
    def prefill(self) -> list[SeqSpan]:
        return [s for s in self.seqs if s.length > 1]


@dataclass
class KVPool:
    """Flat paged KV storage: per layer k, v [num_slots, kv_heads, head_dim], in the compute
    dtype, or int8 with float32 scales [num_slots, kv_heads, 1] (`kv_dtype: int8`)."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    k_scale: list[torch.Tensor] = field(default_factory=list)  # int8 pools only
    v_scale: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def allocate(
        cls, cfg: ArchConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str,
        kv_dtype: str = "auto",
    ) -> KVPool:
        shape = (num_slots, cfg.num_key_value_heads, cfg.head_dim)
        n = cfg.num_hidden_layers
        int8 = kv_dtype == "int8"
        store = torch.int8 if int8 else dtype
        scale = (num_slots, cfg.num_key_value_heads, 1)

        def scales() -> list[torch.Tensor]:
            return [torch.ones(scale, dtype=torch.float32, device=device) for _ in range(n)] \
                if int8 else []

        return cls(
            [torch.zeros(shape, dtype=store, device=device) for _ in range(n)],
            [torch.zeros(shape, dtype=store, device=device) for _ in range(n)],
            scales(),
            scales(),
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every pool tensor; each indexes slots on its dimension 0."""
        return [*self.k, *self.v, *self.k_scale, *self.v_scale]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor,
                                     tuple[torch.Tensor, torch.Tensor] | None]:
        """Layer i's k and v (and their scales, int8 pools only)."""
        scales = (self.k_scale[i], self.v_scale[i]) if self.k_scale else None
        return self.k[i], self.v[i], scales

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        h, qd, kvd = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        )
        self.q_proj = Proj(h, qd, cfg.attention_bias)
        self.k_proj = Proj(h, kvd, cfg.attention_bias)
        self.v_proj = Proj(h, kvd, cfg.attention_bias)
        self.o_proj = Proj(qd, h, cfg.attention_out_bias)
        self.fused: Fused | None = None  # [q; k; v] in one packed GEMM (packing.py)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora: LoraBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        if self.fused is not None:
            q, k, v = self.fused(x, lora)
        else:
            q, k, v = (p(x, lora) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(*lead, self.heads, self.head_dim)
        k = k.view(*lead, self.kv_heads, self.head_dim)
        v = v.view(*lead, self.kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin, None)  # [B, T, H, D]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return self.o_proj.forward(o.transpose(1, 2).reshape(b, t, -1))

    def forward_step(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        step: StepInput,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin, step.lora)  # [N, H, D]
        slots = step.write_slots
        if scales is None:
            k_cache.index_copy_(0, slots, k)
            v_cache.index_copy_(0, slots, v)
        else:  # int8: each token's head stored with its own scale
            for cache, scale, x_ in ((k_cache, scales[0], k), (v_cache, scales[1], v)):
                xq, xs = quantize(x_)
                cache.index_copy_(0, slots, xq)
                scale.index_copy_(0, slots, xs)
        decode = step.decode_batch()
        prefill = step.prefill
        if decode is not None and decode.leading and decode.size == q.shape[0]:
            out = decode_attention(q, k_cache, v_cache, decode, scales)  # rows 0..B-1: all decode
        else:
            out = torch.empty_like(q)
            if decode is not None:
                qd = q.index_select(0, decode.rows)
                out.index_copy_(0, decode.rows,
                                decode_attention(qd, k_cache, v_cache, decode, scales))
            for s in prefill:
                rows = slice(s.start, s.start + s.length)
                out[rows] = prefill_attention(q[rows], k_cache, v_cache, s.kv_slots, scales)
        return self.o_proj.forward(out.reshape(out.shape[0], -1), step.lora)


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.gate_proj = Proj(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Proj(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Proj(cfg.intermediate_size, cfg.hidden_size)
        self.fused: Fused | None = None  # [gate; up] in one packed GEMM (packing.py)

    def hidden(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        """silu(gate(x)) * up(x): the down projection's input."""
        if self.fused is not None:
            gate, up = self.fused(x, lora)
        else:
            gate, up = self.gate_proj(x, lora), self.up_proj(x, lora)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        return self.down_proj.forward(self.hidden(x, lora), lora)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Embedding(nn.Embedding):
    """Token embeddings; `project` is the tied lm_head (h @ weight.T)."""

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class Decoder(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """The model. Build on the meta device and assign loaded weights, or train from random."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Proj(cfg.hidden_size, cfg.vocab_size)
        self.inv_freq = rope_inv_freq(cfg)  # plain attribute: not in state_dict, never meta
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations, KV cache and adapters use this dtype (weights may be int8)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def lora_stack_bytes(self) -> int:
        """Bytes of the adapters' concatenated stacks the projections keep (`STACK_SETS` sets
        each): copies of resident adapters, counted in the snapshot's workspace."""
        stacks = [m.stacks for m in self.modules() if isinstance(m, Proj)]
        stacks += [g.fused.stacks for layer in self.layers for g in (layer.self_attn, layer.mlp)
                   if g.fused is not None]
        return sum(st.nbytes for st in stacks)

    @property
    def layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.model.layers]

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv  # [..., T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]  # [..., T, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.project(h)
        return self.lm_head.forward(h)

    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V], causal from position 0, no cache."""
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self._rope(pos, x.dtype)
        for layer in self.layers:
            x = x + layer.self_attn.forward_full(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._logits(self.model.norm(x)).float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.forward_full(input_ids)

    def forward_step(self, step: StepInput, kv: KVPool) -> torch.Tensor:
        """Flat tokens of several sequences -> logits [S, V] at step.logits_rows (float32)."""
        x = self.model.embed_tokens(step.input_ids)
        cos, sin = self._rope(step.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attn.forward_step(
                layer.input_layernorm(x), cos, sin, step, *kv.layer(i)
            )
            x = x + layer.mlp(layer.post_attention_layernorm(x), step.lora)
        h = self.model.norm(x.index_select(0, step.logits_rows))
        return self._logits(h).float()
