"""Attention over the paged KV pool: one batched call per layer for every decoding sequence,
one SDPA call per prefill chunk.

Pool layout, per layer: k, v [num_slots, kv_heads, head_dim] (slot-major: a slot is one
contiguous row of every KV head, so a gather copies whole rows; SDPA reads the gathered keys
through a head-strided view. Measured against head-major [kv_heads, num_slots, head_dim] on the
mid-size shape, 2 threads: a layer's decode gather + SDPA took half the time at batch 8 and 32.)

Decode (each sequence b feeds one token and sees n_b positions; L = the batch's longest
context rounded up to whole blocks; g(h) = the KV head of query head h):

    out[b, h] = softmax(q[b, h] . K[g(h), slots[b, :L]]^T / sqrt(D), masked to j < n_b)
                . V[g(h), slots[b, :L]]          (padding reads slot 0 and is masked out)

computed as one SDPA call whose "query positions" are the query heads sharing a KV head: with
one new token per sequence they all see the same keys under the same mask, so no GQA
expansion and no causal mask are needed, and torch's fused CPU kernel takes it.

Prefill (a chunk of n tokens of one sequence whose context is c >= n positions): causal SDPA
over its c gathered positions, the mask offset by c - n.

An int8 pool (`kv_dtype: int8`) stores each token's K and V per head as int8 with one float32
scale: x ~ q x s, s = max|x| / 127 (`quantize`); gathers dequantize what they read
(`gather`), so attention itself is the same.

The batched decode adds the same products as the per-sequence attention, but in another
order (padded length, grouped heads), so logits agree to rounding, not bit for bit; the tests
compare greedy tokens of solo and batched runs, and logits against transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecodeBatch:
    """The decoding sequences of one step: their flat rows, padded slot table and mask."""

    rows: torch.Tensor  # [B] flat token rows of the decoding sequences
    slots: torch.Tensor  # [B * L] pool slots, row-major, padding = slot 0
    mask: torch.Tensor  # [B, 1, 1, L] True where the position is in the sequence's context
    length: int  # L
    leading: bool  # rows are 0..B-1 in order (the runner puts decoding sequences first)
    # the step's gathered K and V [B * L, KVH, D], made by the first layer and refilled by
    # every other (a fresh tensor of that size per layer cost more than the gather itself)
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: torch.Tensor | None = None  # the mask as SDPA adds it (0 / -inf), made once a step

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @classmethod
    def from_tables(
        cls,
        rows: list[int],
        tables: list[list[int]],
        lengths: list[int],
        block_size: int,
        device: torch.device,
    ) -> DecodeBatch:
        """From block tables (the scheduler's view): sequence b uses blocks tables[b]."""
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        slots = (padded[:, :, None] * block_size + torch.arange(block_size)).reshape(len(rows), -1)
        return cls._make(rows, slots, lengths, device)

    @classmethod
    def from_slots(
        cls, rows: list[int], slots: list[torch.Tensor], device: torch.device
    ) -> DecodeBatch:
        """From each sequence's slot list (positions 0..n-1), padded to the longest."""
        lengths = [int(s.numel()) for s in slots]
        table = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for b, s in enumerate(slots):
            table[b, : lengths[b]] = s.cpu()
        return cls._make(rows, table, lengths, device)

    @classmethod
    def _make(
        cls, rows: list[int], table: torch.Tensor, lengths: list[int], device: torch.device
    ) -> DecodeBatch:
        width = int(table.shape[1])
        valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return cls(
            rows=torch.tensor(rows, dtype=torch.long).to(device),
            slots=table.reshape(-1).to(device),
            mask=valid[:, None, None, :].to(device),
            length=width,
            leading=rows == list(range(len(rows))),
        )


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scale [..., 1]): x ~ q * scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    return (xf / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def gather(cache: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor,
           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """cache[slots] [n, KVH, D] in `dtype` (dequantized when the pool is int8), into `out`
    when given (a pool in `dtype`)."""
    if scale is None:
        return cache.index_select(0, slots) if out is None else torch.index_select(
            cache, 0, slots, out=out)
    part = cache.index_select(0, slots)
    return (part.float() * scale.index_select(0, slots)).to(dtype)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: DecodeBatch,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> [B, H, D]; caches [slots, KVH, D] (with their
    [slots, KVH, 1] scales when int8)."""
    b, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    ks, vs = scales if scales is not None else (None, None)
    kb = vb = None
    if scales is None:
        if batch.gathered is None:
            n = batch.slots.numel()
            batch.gathered = (q.new_empty(n, kv_heads, dim), q.new_empty(n, kv_heads, dim))
        kb, vb = batch.gathered
    shape = (b, batch.length, kv_heads, dim)
    k = gather(k_cache, ks, batch.slots, q.dtype, kb).view(shape).transpose(1, 2)
    v = gather(v_cache, vs, batch.slots, q.dtype, vb).view(shape).transpose(1, 2)
    if batch.bias is None:  # SDPA would convert the boolean mask on every call
        batch.bias = torch.zeros(batch.mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~batch.mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.view(b, kv_heads, group, dim), k, v, attn_mask=batch.bias
    )  # [B, KVH, G, D]
    return out.reshape(b, heads, dim)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [n, H, D], the last n of the c positions at `slots` [c] -> [n, H, D] (causal)."""
    n, ctx = q.shape[0], slots.numel()
    k_scale, v_scale = scales if scales is not None else (None, None)
    ks = gather(k_cache, k_scale, slots, q.dtype).transpose(0, 1)[None]  # [1, KVH, c, D]
    vs = gather(v_cache, v_scale, slots, q.dtype).transpose(0, 1)[None]
    qs = q.transpose(0, 1)[None]  # [1, H, n, D]: 4-D inputs take the fused CPU kernel
    mask: torch.Tensor | None = None
    if 1 < n < ctx:
        qpos = torch.arange(ctx - n, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
    o = F.scaled_dot_product_attention(
        qs, ks, vs, attn_mask=mask, is_causal=n == ctx and n > 1, enable_gqa=True
    )
    return o[0].transpose(0, 1)
