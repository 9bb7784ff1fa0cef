"""What a request will ask of its backend: tokens, KV bytes, adapter bytes (before dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.backend import Backend, Capacity
from gateway.core.context import RequestContext
from gateway.core.kv import kv_bytes_for

CHARS_PER_TOKEN = 4  # the estimate where a backend cannot count (remote upstreams)


@dataclass(frozen=True, slots=True)
class Demand:
    prompt_tokens: int
    max_tokens: int
    kv_bytes: int  # 0 where the backend reports no capacity
    budget: int | None  # the backend's whole KV budget, None where unknown
    adapter_bytes: int = 0  # to load the adapter, when it is not resident

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


def prompt_tokens(backend: Backend, ctx: RequestContext) -> int:
    """Exact count with the backend's tokenizer after its chat template; else an estimate."""
    if ctx.prompt_tokens is not None:
        return ctx.prompt_tokens
    counted = backend.count_tokens(ctx)
    if counted is not None:
        ctx.prompt_tokens = counted
        return counted
    text = ctx.prompt or "".join(str(m.get("content", "")) for m in ctx.messages or [])
    return len(text) // CHARS_PER_TOKEN + 1


def demand(backend: Backend, ctx: RequestContext) -> Demand:
    cap: Capacity | None = backend.capacity()
    tokens = prompt_tokens(backend, ctx)
    max_tokens = ctx.sampling.max_tokens
    if cap is None:
        return Demand(tokens, max_tokens, 0, None)
    kv = kv_bytes_for(tokens + max_tokens, cap.block_size, cap.bytes_per_token)
    adapter_bytes = 0
    if ctx.adapter is not None and ctx.adapter not in cap.resident_adapters:
        adapter_bytes = (backend.adapters() or {}).get(ctx.adapter, 0)
    return Demand(tokens, max_tokens, kv, cap.kv_bytes_total, adapter_bytes)
