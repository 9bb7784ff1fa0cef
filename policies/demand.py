"""What a request will ask of its backend: tokens, KV bytes, adapter bytes (before dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gateway.core import cpu
from gateway.core.backend import Backend, Capacity
from gateway.core.context import RequestContext
from gateway.core.kv import kv_bytes_for, kv_output_tokens
from policies.estimate import Estimates

CHARS_PER_TOKEN = 4  # the estimate where a backend cannot count (remote upstreams)


@dataclass(frozen=True, slots=True)
class Demand:
    prompt_tokens: int
    max_tokens: int  # per sequence: the output limit reserved for (see output_limit)
    kv_bytes: int  # 0 where the backend reports no capacity
    budget: int | None  # the backend's whole KV budget, None where unknown
    adapter_bytes: int = 0  # to load the adapter, when it is not resident
    sequences: int = 1  # n: each sequence holds its own KV
    expected_tokens: int | None = None  # output tokens expected per sequence (policies/estimate.py)
    long: bool = False  # the long lane (the backend's lanes: prompt + limit past short_max_tokens)

    @property
    def tokens(self) -> int:
        """What a tokens-per-minute quota is charged at admission: prompt + each sequence's
        estimate (its limit where there is none), settled to the usage at the end."""
        out = self.max_tokens if self.expected_tokens is None else self.expected_tokens
        return self.prompt_tokens + self.sequences * out


def output_limit(ctx: RequestContext, cap: Capacity | None, prompt_tokens: int) -> int:
    """The output tokens to reserve for, per sequence: the request's limit; where it names
    none, the worst case, which is the context's end on a backend that reports its window
    and nothing on one that does not (a remote upstream: no KV reservation for its answer).
    The one place that decides it: admission on an estimate replaces this function."""
    if ctx.kind == "embeddings":
        return 0
    if ctx.sampling.max_tokens is not None:
        return ctx.sampling.max_tokens
    if cap is not None and cap.context_window > 0:
        return max(0, cap.context_window - prompt_tokens)
    return 0


async def prompt_tokens(backend: Backend, ctx: RequestContext) -> int:
    """Exact count with the backend's tokenizer after its chat template, counted once (off
    the event loop when the request is large: gateway/core/cpu.py); else an estimate."""
    counted = await cpu.count_prompt(ctx, backend.count_tokens)
    if counted is not None:
        return counted
    # the body as sent counts what the upstream's template renders: messages, tools, schemas
    return len(orjson.dumps(ctx.body)) // CHARS_PER_TOKEN + 1


def estimate_key(ctx: RequestContext) -> tuple[str, str, str]:
    """Whose answers predict this one's length: the tenant's, on this model and adapter."""
    return (ctx.tenant, ctx.target_model, ctx.adapter or "")


async def demand(backend: Backend, ctx: RequestContext, estimates: Estimates | None = None,
                 kv_admission: str | None = None) -> Demand:
    """`estimates`: the expected output length (else the limit); `kv_admission`: what the
    KV reservation counts for the output, the limit or the estimate (kv_output_tokens); by
    default the backend's own choice (Capacity.kv_admission)."""
    cap: Capacity | None = backend.capacity()
    tokens = await prompt_tokens(backend, ctx)
    prompts = prompt_count(ctx)
    max_tokens = output_limit(ctx, cap, tokens if prompts == 1 else 0)
    n = ctx.sampling.n
    expected = max_tokens if estimates is None else estimates.expected(estimate_key(ctx), max_tokens)
    if cap is None:
        return Demand(tokens, max_tokens, 0, None, sequences=n * prompts, expected_tokens=expected)
    # Each sequence holds prompt + its output reservation (the limit, or the estimate with
    # kv_admission: estimate), in whole blocks: with several prompts, each is rounded up on
    # its own (at most one block more each than their sum).
    out = kv_output_tokens(max_tokens, expected, kv_admission or cap.kv_admission)
    kv = n * (kv_bytes_for(tokens + prompts * out, cap.block_size, cap.bytes_per_token)
              + (prompts - 1) * cap.block_size * cap.bytes_per_token)
    adapter_bytes = 0
    if ctx.adapter is not None and ctx.adapter not in cap.resident_adapters:
        adapter_bytes = (backend.adapters() or {}).get(ctx.adapter, 0)
    long = cap.lanes is not None and cap.lanes.is_long(tokens + max_tokens)
    return Demand(tokens, max_tokens, kv, cap.kv_bytes_total, adapter_bytes, n * prompts, expected,
                  long)


def prompt_count(ctx: RequestContext) -> int:
    """Prompts in one completions request (a list of strings or of token-id lists), else 1."""
    p = ctx.prompt
    if ctx.kind == "completion" and isinstance(p, list) and p and not isinstance(p[0], int):
        return len(p)
    return 1
