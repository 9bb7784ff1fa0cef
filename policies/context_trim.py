"""context_trim: fit a chat into `context_window - max_tokens` (and optionally the tenant's KV
share) by dropping whole turns, counting exactly with the target backend's tokenizer after its
chat template.

Kept always: every system message and the last user message with whatever follows it. A
strategy lists which other messages to keep, from "all" down to "none", and the policy keeps
the most that fit:
  drop_oldest  keep the newest turns
  middle_out   keep the first turn (it often frames the task) and the newest; drop the middle
  none         never trim
Each candidate starts its kept history at a user message, so no reply is kept without its
question. If even the kept minimum does not fit: 400 context_length_exceeded.
Response header: x-gateway-trimmed-tokens.

Bounded work (DESIGN, third wave): candidates are made one at a time, when the search asks for
one (never the whole list of lists: that was quadratic in memory), and the search starts from
the smallest candidate and gallops up (1, 2, 4, ... turns more), then bisects, so what it
tokenizes is about twice what it keeps plus the one full count, whatever the conversation's
length. A large request does all of it on the tenant-fair CPU pool (gateway/core/cpu.py), off
the event loop; server.request_bounds.max_messages bounds the list first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from gateway.core import cpu
from gateway.core.backend import Backend
from gateway.core.context import Decision, RequestContext
from gateway.core.errors import ContextLengthExceeded
from gateway.core.policy import NoOptions, Outcome, modified, passed
from policies.chain import PolicyEnv

Messages = list[dict[str, Any]]


class Candidates:
    """The kept index lists of a strategy, from the most kept (0) to the fewest (len - 1),
    each made on demand in O(len(messages)). `first` (middle_out): the droppable indices
    always kept, except by the last candidate, which keeps only what stays."""

    def __init__(self, messages: Messages, first_turn: bool = False) -> None:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"),
                        default=len(messages))
        self.droppable = [i for i, m in enumerate(messages[:last_user])
                          if m["role"] not in ("system", "developer")]
        gone = set(self.droppable)
        self.kept = [i for i in range(len(messages)) if i not in gone]
        # positions k in droppable where a kept suffix droppable[k:] may start (a user turn)
        self.starts = [k for k, i in enumerate(self.droppable)
                       if messages[i]["role"] == "user"] + [len(self.droppable)]
        self.first = self.droppable[: self.starts[1]] if first_turn and len(self.starts) >= 3 else None
        if self.first is not None:
            self.starts = self.starts[1:]

    def __len__(self) -> int:
        return len(self.starts) + (1 if self.first is not None else 0)

    def __iter__(self) -> Iterator[list[int]]:
        return (self[k] for k in range(len(self)))

    def __getitem__(self, k: int) -> list[int]:
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        if k == len(self.starts):  # middle_out's last resort: the first turn goes too
            return self.kept
        suffix = self.droppable[self.starts[k]:]
        return sorted(self.kept + (self.first or []) + suffix)


class Ladder(Protocol):
    """A strategy's candidates, from the most kept (0) to the fewest (len - 1)."""

    def __len__(self) -> int: ...

    def __getitem__(self, k: int) -> list[int]: ...


def drop_oldest(messages: Messages) -> Ladder:
    return Candidates(messages)


def middle_out(messages: Messages) -> Ladder:
    return Candidates(messages, first_turn=True)


def no_trim(messages: Messages) -> Ladder:
    return [list(range(len(messages)))]


STRATEGIES: dict[str, Callable[[Messages], Ladder]] = {
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
        strategy = self.env.tenant(ctx).trim.strategy
        return await cpu.offload(ctx.tenant, ctx.body_bytes,
                                 lambda: self._fit(ctx, backend, limit, strategy))

    def _fit(self, ctx: RequestContext, backend: Backend, limit: int, strategy: str) -> Decision:
        """Count, and trim to `limit` when needed (runs on a pool thread for large requests:
        it only reads ctx and sets its messages and counts)."""
        total = backend.count_tokens(ctx)
        if total is None:
            return passed(self.name, "backend cannot count tokens")
        ctx.prompt_tokens = total
        if total <= limit:
            return passed(self.name)
        if ctx.messages is None or limit <= 0:
            raise self._too_long(total, limit)
        messages = ctx.messages
        candidates = STRATEGIES[strategy](messages)
        trials: dict[int, tuple[int, RequestContext]] = {}

        def count(k: int) -> int:
            if k not in trials:
                trial = dataclasses.replace(ctx, messages=[messages[i] for i in candidates[k]])
                trials[k] = (backend.count_tokens(trial) or 0, trial)
            return trials[k][0]

        # the first candidate that fits: gallop from the fewest kept towards more, then bisect
        hi = len(candidates) - 1
        if count(hi) > limit:
            raise self._too_long(total, limit)
        step, lo = 1, 0
        while hi > 0:
            probe = max(0, hi - step)
            if count(probe) > limit:
                lo = probe + 1
                break
            hi, step = probe, step * 2
        while lo < hi:
            mid = (lo + hi) // 2
            if count(mid) <= limit:
                hi = mid
            else:
                lo = mid + 1
        kept, trial = trials[hi]
        ctx.messages = trial.messages
        ctx.tokenized = trial.tokenized  # the backend reuses the ids it counted
        ctx.prompt_tokens = kept
        ctx.trimmed_tokens = total - kept
        dropped = len(messages) - len(trial.messages or [])
        return modified(self.name, f"dropped {dropped} messages ({total - kept} tokens)")

    def _too_long(self, total: int, limit: int) -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"This model's context leaves {max(limit, 0)} tokens for the prompt after "
            f"max_tokens; your messages take at least {total} tokens and the last user message "
            "cannot be dropped. Shorten it or lower max_tokens.",
            param="messages",
        )

    async def on_finish(self, ctx: RequestContext, outcome: Outcome) -> None:
        return None
