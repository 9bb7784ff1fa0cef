"""Step workspace: bytes of the activations and staging tensors one engine step allocates.

An estimate from the shapes `Llama.forward_step` creates (torch on CPU has no allocator
counter): with N new tokens, S sequences, hidden H, q width Q, kv width K, MLP width I,
vocab V and element size e,

    resident = 2 N H e                                         (residual + normed input)
    attn     = N (2Q + 3K) e + N Q e + max(prefill, decode)    (q,k,v, roped, out, and:)
    prefill  = max over chunks of 2 c_s K e + heads n_s c_s e  (one chunk's gathered K/V + scores)
    decode   = B L (2 K e + (heads + 1) e)                     (the B decoding sequences' K/V
                                                               gathered to L = longest context in
                                                               whole blocks, once for all layers;
                                                               their scores and additive mask)
    mlp      = 3 N I e                                         (gate, up, product)
    logits   = S V (e + 4)                                     (logits + float32 copy)
    dequant  = largest int8 matrix x e                         (QuantProj's transient float weight)
    index    = 8 (4 N + sum c_s)                               (ids, positions, slots)
    step     = resident + max(attn, mlp) + logits + dequant + index
"""

from __future__ import annotations

import torch

from backends.hf.config import ArchConfig
from backends.local.model import Llama
from gateway.core.kv import blocks_for


def largest_int8_matrix(model: Llama) -> int:
    return max(
        (p.numel() for p in model.parameters() if p.dtype == torch.int8 and p.dim() == 2),
        default=0,
    )


class WorkspaceMeter:
    """Per-step workspace estimate, its last and peak values, and per-sequence shares."""

    def __init__(self, cfg: ArchConfig, elem_bytes: int, model: Llama, block_size: int) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.elem = elem_bytes
        self.dequant = largest_int8_matrix(model) * elem_bytes
        self.last = 0
        self.peak = 0

    def step_bytes(self, spans: list[tuple[int, int]]) -> int:
        """spans: (new tokens, context length) per sequence of one step."""
        c, e = self.cfg, self.elem
        n = sum(t for t, _ in spans)
        q, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        resident = 2 * n * c.hidden_size * e
        heads = c.num_attention_heads
        prefill = max(
            (2 * ctx * k * e + heads * t * ctx * e for t, ctx in spans if t > 1), default=0
        )
        decoding = [ctx for t, ctx in spans if t == 1]
        width = blocks_for(max(decoding, default=0), self.block_size) * self.block_size
        decode = len(decoding) * width * (2 * k * e + (heads + 1) * e)
        attn = n * (3 * q + 3 * k) * e + max(prefill, decode)
        mlp = 3 * n * c.intermediate_size * e
        logits = len(spans) * c.vocab_size * (e + 4)
        index = 8 * (4 * n + sum(ctx for _, ctx in spans))
        return resident + max(attn, mlp) + logits + self.dequant + index

    def record(self, spans: list[tuple[int, int]]) -> list[int]:
        """Account one step; returns each sequence's share (by its new tokens)."""
        total = self.step_bytes(spans)
        self.last = total
        self.peak = max(self.peak, total)
        n = sum(t for t, _ in spans) or 1
        return [total * t // n for t, _ in spans]
