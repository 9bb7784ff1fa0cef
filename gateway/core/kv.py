"""The KV and adapter byte arithmetic, in plain Python: one place for the numbers the engine,
`gateway plan`, admission and the remote kinds share, so a plan and the live system agree.

    bytes_per_token = 2 x layers x kv_heads x head_dim x dtype_bytes
                    = 2 x layers x kv_heads x (head_dim + 4)   with kv_dtype: int8 (one
                      float32 scale per token per head)
    blocks_for(t)   = ceil(t / block_size)
    kv_bytes_for(t) = blocks_for(t) x block_size x bytes_per_token
    adapter bytes   = sum over modules of r x (d_in + d_out) x dtype_bytes
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_ADMISSION_MODES = ("estimate", "worst_case")
KV_DTYPES = ("auto", "int8")  # auto: the compute dtype
KV_SCALE_BYTES = 4  # int8 KV: one float32 scale per token per head, for K and for V


def dtype_bytes(name: str) -> int:
    """Bytes of one element of a float dtype by its config name; ValueError for another."""
    try:
        return FLOAT_BYTES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {', '.join(FLOAT_BYTES)}") from None


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, elem_bytes: int,
                       kv_dtype: str = "auto") -> int:
    """K and V of one token in every layer: in the compute dtype (`auto`, `elem_bytes` each)
    or as int8 with a scale per head (`int8`)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}")
    if kv_dtype == "int8":
        return 2 * layers * kv_heads * (head_dim + KV_SCALE_BYTES)
    return 2 * layers * kv_heads * head_dim * elem_bytes


def blocks_for(tokens: int, block_size: int) -> int:
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    return -(-max(tokens, 0) // block_size)


def kv_bytes_for(tokens: int, block_size: int, bytes_per_token: int) -> int:
    """KV bytes for `tokens` tokens in whole blocks: ceil(tokens / block) x block x bytes/token."""
    if tokens < 0 or block_size <= 0 or bytes_per_token < 0:
        raise ValueError("tokens >= 0, block_size > 0 and bytes_per_token >= 0 are required")
    return blocks_for(tokens, block_size) * block_size * bytes_per_token


def adapter_module_bytes(r: int, d_in: int, d_out: int, elem_bytes: int) -> int:
    """One LoRA pair A [r, d_in], B [d_out, r]."""
    return r * (d_in + d_out) * elem_bytes


def kv_output_tokens(limit: int, expected: int, mode: str = "worst_case") -> int:
    """Output tokens whose KV a request reserves at admission: the limit ("worst_case",
    reserve-all: nothing is ever preempted) or the estimate ("estimate": the engine preempts
    when an estimate was wrong). The one seam where a backend's `kv_admission` applies: the
    admission policy and the local engine both call it."""
    if mode not in KV_ADMISSION_MODES:
        raise ValueError(f"kv_admission must be one of {', '.join(KV_ADMISSION_MODES)}")
    return expected if mode == "estimate" else limit


@dataclass(frozen=True)
class Lanes:
    """Length lanes (`lanes: {short_max_tokens, short_share}`): a request whose context can
    reach past `short_max_tokens` (prompt + output limit) is long, and long requests together
    may hold at most (1 - short_share) of the KV budget, so a flood of long-context requests
    never blocks short ones. The engine applies it in blocks, admission in bytes."""

    short_max_tokens: int = 512
    short_share: float = 0.25

    def __post_init__(self) -> None:
        if self.short_max_tokens <= 0 or not 0 < self.short_share < 1:
            raise ValueError("lanes: short_max_tokens must be positive, short_share in (0, 1)")

    def is_long(self, context_tokens: int) -> bool:
        return context_tokens > self.short_max_tokens

    def long_cap(self, total: int) -> int:
        """What long requests may hold of `total` (blocks or bytes)."""
        return total - math.ceil(self.short_share * total)
