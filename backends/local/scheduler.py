"""Which sequences run in the next step (plain Python; the engine does the torch work).

Continuous batching: each step runs every decoding sequence for one token, plus chunks of
prompts still being prefilled, in one flat batch. A waiting sequence is admitted first-come
first-served when a batch slot is free and the KV cache can reserve its prompt + max_tokens.

Admission reserves every block a sequence can ever need, so a running sequence never waits for
memory and nothing is ever preempted (simpler than vLLM's preemption, same promise: the cache
never runs out mid-sequence). Chunked prefill keeps a long prompt from stalling the others:
prompt tokens per step are capped by `max_prefill_tokens`, decode tokens are never held back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends.local.block_manager import BlockManager


@dataclass
class Sequence:
    """One generation request as the engine sees it."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    adapter_slot: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    cancelled: bool = False
    finished: bool = False
    state: Any = None  # the engine's per-sequence state (sampler, detokenizer, stop filter)
    on_admit: Callable[[], None] | None = None
    chunk: int = 0  # pending tokens fed in the current step

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens remain uncached (no token can be sampled yet)."""
        return self.num_cached < len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    def pending_ids(self) -> list[int]:
        """Tokens not yet in the cache (the prompt, then the last generated token)."""
        all_ids = self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids
        return all_ids[self.num_cached :]

    def step_ids(self) -> list[int]:
        """The tokens fed in the current step: the first `chunk` pending ones."""
        return self.pending_ids()[: self.chunk]


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: int


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int = 512
    ) -> None:
        if max_batch_size <= 0 or max_prefill_tokens <= 0:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel(self, seq_id: int) -> Sequence | None:
        """Drop a sequence wherever it is and free its blocks."""
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                seq.cancelled = True
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                seq.cancelled = True
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.seq_id)

    def schedule(self) -> ScheduledBatch:
        """Admit what fits, then give each running sequence this step's tokens (its chunk).

        Decoding sequences get their one token; prefilling ones share `max_prefill_tokens`,
        shortest remaining prompt first. Sequences with an empty chunk sit this step out.
        """
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.blocks.can_reserve(seq.max_total_tokens):
                break  # FIFO: later requests do not overtake one that waits for memory
            self.waiting.popleft()
            self.blocks.reserve(seq.seq_id, seq.max_total_tokens)
            self.running.append(seq)
            if seq.on_admit is not None:
                seq.on_admit()
        budget = self.max_prefill_tokens
        batch: list[Sequence] = []
        decoding = [s for s in self.running if not s.prefilling]
        # shortest remaining prompt first: a short prompt is not stuck behind a long one
        prefilling = sorted(
            (s for s in self.running if s.prefilling), key=lambda s: len(s.pending_ids())
        )
        for seq in decoding + prefilling:
            pending = len(seq.pending_ids())
            if seq.prefilling:
                seq.chunk = min(pending, budget)
                budget -= seq.chunk
            else:
                seq.chunk = pending
            if seq.chunk:
                self.blocks.ensure(seq.seq_id, seq.num_cached + seq.chunk)
                batch.append(seq)
        return ScheduledBatch(batch, sum(s.chunk for s in batch))
