"""context_trim: fit a chat into `context_window - max_tokens` (and optionally the tenant's KV
share) by dropping whole turns, counting exactly with the target backend's tokenizer after its
chat template.

Kept always: every system message and the last user message with whatever follows it. A
strategy lists which other messages to keep, from "all" down to "none", and the policy keeps
the most that fit (binary search, a few tokenizations):
  drop_oldest  keep the newest turns
  middle_out   keep the first turn (it often frames the task) and the newest; drop the middle
  none         never trim
Each candidate starts its kept history at a user message, so no reply is kept without its
question. If even the kept minimum does not fit: 400 context_length_exceeded.
Response header: x-gateway-trimmed-tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gateway.core.context import Decision, RequestContext
from gateway.core.errors import ContextLengthExceeded
from gateway.core.policy import NoOptions, Outcome, modified, passed
from policies.base import PolicyEnv

Messages = list[dict[str, Any]]


def _history(messages: Messages) -> tuple[list[int], list[int]]:
    """(indices that may go: non-system messages before the last user message, those that stay)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages))
    droppable = [i for i, m in enumerate(messages[:last_user])
                 if m["role"] not in ("system", "developer")]
    kept = [i for i in range(len(messages)) if i not in set(droppable)]
    return droppable, kept


def _turn_starts(messages: Messages, idx: list[int]) -> list[int]:
    """Positions k in idx where a kept suffix idx[k:] may start (at a user message), and the end."""
    return [k for k, i in enumerate(idx) if messages[i]["role"] == "user"] + [len(idx)]


def drop_oldest(messages: Messages) -> list[list[int]]:
    droppable, kept = _history(messages)
    return [sorted(kept + droppable[k:]) for k in _turn_starts(messages, droppable)]


def middle_out(messages: Messages) -> list[list[int]]:
    droppable, kept = _history(messages)
    starts = _turn_starts(messages, droppable)
    if len(starts) < 3:  # at most one turn: nothing in the middle
        return drop_oldest(messages)
    first = droppable[: starts[1]]
    out = [sorted(kept + first + droppable[k:]) for k in starts[1:]]
    return [*out, sorted(kept)]  # last resort: the first turn goes too


def no_trim(messages: Messages) -> list[list[int]]:
    return [list(range(len(messages)))]


STRATEGIES: dict[str, Callable[[Messages], list[list[int]]]] = {
    "drop_oldest": drop_oldest,
    "middle_out": middle_out,
    "none": no_trim,
}


class ContextTrim:
    name = "context_trim"
    Config = NoOptions

    def __init__(self, env: PolicyEnv, cfg: NoOptions) -> None:
        self.env = env

    def _limit(self, ctx: RequestContext) -> int | None:
        """Most prompt tokens this request may have; None where the backend cannot tell."""
        cap = self.env.backend(ctx).capacity()
        if cap is None:
            return None
        # room for the answer: its limit, or at least one token where the request names none
        answer = ctx.sampling.max_tokens if ctx.sampling.max_tokens is not None else 1
        limit = cap.context_window - answer
        tenant = self.env.tenant(ctx)
        share = tenant.limits.max_kv_share
        if tenant.trim.fit_kv_share and share is not None and cap.bytes_per_token > 0:
            block_bytes = cap.block_size * cap.bytes_per_token
            share_tokens = int(share * cap.kv_bytes_total) // block_bytes * cap.block_size
            limit = min(limit, share_tokens - answer)
        return limit

    async def apply(self, ctx: RequestContext) -> Decision:
        backend = self.env.backend(ctx)
        limit = self._limit(ctx)
        if limit is None:
            return passed(self.name, "backend reports no context window")
        total = backend.count_tokens(ctx)
        if total is None:
            return passed(self.name, "backend cannot count tokens")
        ctx.prompt_tokens = total
        if total <= limit:
            return passed(self.name)
        if ctx.messages is None or limit <= 0:
            raise self._too_long(total, limit)
        messages = ctx.messages
        candidates = STRATEGIES[self.env.tenant(ctx).trim.strategy](messages)

        counts: dict[int, int] = {}

        def count(k: int) -> int:
            if k not in counts:
                trial = dataclasses.replace(ctx, messages=[messages[i] for i in candidates[k]])
                counts[k] = backend.count_tokens(trial) or 0
            return counts[k]

        lo, hi = 0, len(candidates) - 1  # the answer is the first candidate that fits
        if count(hi) > limit:
            raise self._too_long(total, limit)
        best = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if count(mid) <= limit:
                best = hi = mid
            else:
                lo = mid + 1
        ctx.messages = [messages[i] for i in candidates[best]]
        kept = count(best)
        ctx.prompt_tokens = kept
        ctx.trimmed_tokens = total - kept
        dropped = len(messages) - len(ctx.messages)
        return modified(self.name, f"dropped {dropped} messages ({total - kept} tokens)")

    def _too_long(self, total: int, limit: int) -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"This model's context leaves {max(limit, 0)} tokens for the prompt after "
            f"max_tokens; your messages take {total} tokens and the last user message "
            "cannot be dropped. Shorten it or lower max_tokens.",
            param="messages",
        )

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        return None
