"""What a request will ask of its backend: tokens, KV bytes, adapter bytes (before dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.backend import Backend, Capacity
from gateway.core.context import RequestContext
from gateway.core.kv import kv_bytes_for
from policies.estimate import Estimates, kv_output_tokens

CHARS_PER_TOKEN = 4  # the estimate where a backend cannot count (remote upstreams)


@dataclass(frozen=True, slots=True)
class Demand:
    prompt_tokens: int
    max_tokens: int  # the request's output limit
    kv_bytes: int  # 0 where the backend reports no capacity
    budget: int | None  # the backend's whole KV budget, None where unknown
    adapter_bytes: int = 0  # to load the adapter, when it is not resident
    expected_tokens: int | None = None  # output tokens expected (policies/estimate.py)

    @property
    def tokens(self) -> int:
        """What a tokens-per-minute quota is charged at admission: prompt + the estimate
        (the output limit where there is none), settled to the usage at the end."""
        out = self.max_tokens if self.expected_tokens is None else self.expected_tokens
        return self.prompt_tokens + out


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


def estimate_key(ctx: RequestContext) -> tuple[str, str, str]:
    """Whose answers predict this one's length: the tenant's, on this model and adapter."""
    return (ctx.tenant, ctx.target_model, ctx.adapter or "")


def demand(backend: Backend, ctx: RequestContext, estimates: Estimates | None = None,
           kv_admission: str = "worst_case") -> Demand:
    """`estimates`: the expected output length (else the limit); `kv_admission`: what the
    KV reservation counts for the output, the limit or the estimate (kv_output_tokens)."""
    cap: Capacity | None = backend.capacity()
    tokens = prompt_tokens(backend, ctx)
    max_tokens = ctx.sampling.max_tokens
    expected = max_tokens if estimates is None else estimates.expected(estimate_key(ctx), max_tokens)
    if cap is None:
        return Demand(tokens, max_tokens, 0, None, expected_tokens=expected)
    out = kv_output_tokens(max_tokens, expected, kv_admission)
    kv = kv_bytes_for(tokens + out, cap.block_size, cap.bytes_per_token)
    adapter_bytes = 0
    if ctx.adapter is not None and ctx.adapter not in cap.resident_adapters:
        adapter_bytes = (backend.adapters() or {}).get(ctx.adapter, 0)
    return Demand(tokens, max_tokens, kv, cap.kv_bytes_total, adapter_bytes, expected)
