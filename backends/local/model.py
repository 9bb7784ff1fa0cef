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
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from backends.hf.config import ArchConfig
from backends.local.attention import DecodeBatch, decode_attention, prefill_attention, quantize
from backends.local.projection import Fused, LoraBatch, Proj


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
