"""Which sequences run in the next step (plain Python; the engine does the torch work).

Continuous batching: each step runs every decoding sequence for one token, plus chunks of
prompts still being prefilled, in one flat batch. A waiting sequence is admitted first-come
first-served when a batch slot is free and the KV cache can reserve what it is expected to
need (`Sequence.reserve_tokens`): prompt + max_tokens under `kv_admission: worst_case`, so
it never needs more and nothing is ever preempted; prompt + the estimate under `estimate`.

Overcommit, with a safety net: a sequence that outgrows its reservation takes unreserved
blocks; when none are left, the scheduler preempts the lowest-priority, most recently
admitted running sequence (possibly the one growing). Its KV goes to host swap space while
`swap_bytes` allows (the engine copies the blocks out before the step's forward and back in
on resume: the same bytes), else it is dropped and recomputed on resume (its prompt and the
tokens it generated are prefilled again; nothing is sampled until it has caught up).
Preempted sequences resume before any waiting one, oldest admission first.

Prefix sharing: a sequence with a `prefix_salt` (its adapter and, with `prefix_cache:
isolated`, its tenant) publishes each full block under a key chained over its tokens
(`block_keys`) once computed, and on admission attaches the cached blocks of its longest
published prefix (at least its last token is computed: it yields the logits to sample from).
Sequences that `follow` a leader (the other choices of an `n > 1` request) wait until the
leader's prompt is cached, then share its blocks.

Length lanes (`lanes`): sequences whose prompt + max_tokens pass `short_max_tokens` are long
and together hold at most `long_cap` blocks (admission and growth); each lane is FIFO on its
own, so short sequences pass long ones that wait for their lane.

Chunked prefill keeps a long prompt from stalling the others: prompt (and catch-up) tokens
per step are capped by `max_prefill_tokens`, decode tokens are never held back.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends.local.block_manager import BlockManager
from gateway.core.kv import Lanes


@dataclass(eq=False)
class Sequence:
    """One generation request as the engine sees it (compared by identity)."""

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
    reserve: int | None = None  # tokens reserved at admission; None: prompt + max_tokens
    priority: int = 1  # 0 high, 1 normal, 2 low: preemption takes the largest first
    admitted: int = 0  # admission order (preemption takes the newest among equals)
    swap: Any = None  # the host copy of its KV while swapped out (the engine's tensors)
    swapped_blocks: int = 0  # blocks of swap space it holds
    prefix_salt: bytes | None = None  # None: never shares blocks (prefix_cache: off, echo)
    keys: list[bytes] = field(default_factory=list)  # of its full blocks, computed as needed
    leader: Sequence | None = None  # waits to share this one's prompt blocks (n > 1)
    cached_tokens: int = 0  # prompt tokens served from cached blocks at its first admission
    wrapper_tokens: int = 0  # forced tool-call wrapper tokens allowed on top of max_tokens
    wrapper_taken: int = 0  # of which taken (output tokens not counted against max_tokens)

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens remain uncached (no token can be sampled yet)."""
        return self.num_cached < len(self.prompt_ids)

    @property
    def catching_up(self) -> bool:
        """More than one token to feed: a prompt, or the tokens of a recomputed sequence."""
        return self.prefilling or self.num_tokens - self.num_cached > 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens + self.wrapper_tokens

    @property
    def counted_tokens(self) -> int:
        """Output tokens counted against max_tokens: all but a call's forced wrapper."""
        return len(self.output_ids) - self.wrapper_taken

    @property
    def reserve_tokens(self) -> int:
        """What admission (or a resume) reserves: the planned tokens, and at least what it
        holds plus the next one."""
        planned = self.max_total_tokens if self.reserve is None else self.reserve
        return max(planned, self.num_cached + 1)

    def pending_ids(self) -> list[int]:
        """Tokens not yet in the cache (the prompt, then the generated ones)."""
        all_ids = self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids
        return all_ids[self.num_cached :]

    def step_ids(self) -> list[int]:
        """The tokens fed in the current step: the first `chunk` pending ones."""
        return self.pending_ids()[: self.chunk]

    @property
    def samples(self) -> bool:
        """This step's chunk ends at its last known token, so a token is sampled after it."""
        return self.num_cached + self.chunk == self.num_tokens


def block_keys(seq: Sequence, count: int, block_size: int) -> list[bytes]:
    """Keys of `seq`'s first `count` full blocks: key_i = H(key_{i-1}, tokens of block i),
    key_-1 = its salt, so a key names the adapter, the salt and every token up to the block's
    end."""
    if seq.prefix_salt is None:
        return []
    ids = seq.prompt_ids + seq.output_ids
    while len(seq.keys) < count:
        i = len(seq.keys)
        parent = seq.keys[-1] if seq.keys else seq.prefix_salt
        tokens = array("q", ids[i * block_size : (i + 1) * block_size]).tobytes()
        seq.keys.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())
    return seq.keys[:count]


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: int
    swap_out: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # before the step
    swap_in: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # after swap_out


@dataclass
class PreemptionStats:
    preemptions: int = 0
    swapped_out: int = 0  # preemptions whose KV went to swap space
    recomputed: int = 0  # preemptions whose KV was dropped
    resumed: int = 0
    prefix_query_tokens: int = 0  # prompt tokens of admitted sequences that may share
    prefix_hit_tokens: int = 0  # of which served from cached blocks


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_size: int,
        max_prefill_tokens: int = 512,
        swap_bytes: int = 0,
        lanes: Lanes | None = None,
    ) -> None:
        if max_batch_size <= 0 or max_prefill_tokens <= 0 or swap_bytes < 0:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive, "
                             "swap_bytes >= 0")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.swap_bytes = swap_bytes
        self.swap_used = 0  # bytes of swap space held by preempted sequences
        self.waiting: deque[Sequence] = deque()
        self.preempted: list[Sequence] = []  # oldest admission first
        self.running: list[Sequence] = []
        self.lanes = lanes
        self.long_cap = None if lanes is None else lanes.long_cap(blocks.num_blocks)
        self.stats = PreemptionStats()
        self._preempted_now: set[int] = set()  # preempted in the current schedule call
        self._order = itertools.count(1)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.preempted)

    @property
    def queued(self) -> list[Sequence]:
        """Sequences not running: preempted ones (which resume first), then waiting ones."""
        return [*self.preempted, *self.waiting]

    def find(self, seq_id: int) -> Sequence | None:
        return next((s for s in [*self.running, *self.queued] if s.seq_id == seq_id), None)

    def cancel(self, seq_id: int) -> Sequence | None:
        """Drop a sequence wherever it is and free its blocks and swap space."""
        for seq in [*self.running, *self.preempted, *self.waiting]:
            if seq.seq_id == seq_id:
                seq.cancelled = True
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        seq.finished = True
        for queue in (self.running, self.preempted, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.blocks.release(seq.seq_id)
        self.release_swap(seq)

    def release_swap(self, seq: Sequence) -> None:
        """`seq` holds no swap space any more (its KV was copied back in, or it ended)."""
        self.swap_used -= seq.swapped_blocks * self.blocks.bytes_per_block
        seq.swapped_blocks = 0
        seq.swap = None

    def schedule(self) -> ScheduledBatch:
        """Resume or admit what fits, then give each running sequence this step's tokens
        (its chunk), preempting where a sequence outgrows its reservation and no block is
        unreserved.

        Decoding sequences get their one token; catching-up ones share `max_prefill_tokens`,
        shortest remaining first. Sequences with an empty chunk sit this step out.
        """
        out = ScheduledBatch([], 0)
        self._admit(out)
        budget = self.max_prefill_tokens
        decoding: list[Sequence] = []
        catching: list[Sequence] = []
        for seq in self.running:
            (catching if seq.catching_up else decoding).append(seq)
        # shortest remaining prompt first: a short prompt is not stuck behind a long one
        catching.sort(key=lambda s: s.num_tokens - s.num_cached)
        self._preempted_now.clear()
        for seq in decoding + catching:
            seq.chunk = 0
            if seq.seq_id in self._preempted_now:  # preempted for an earlier one of this step
                continue
            pending = seq.num_tokens - seq.num_cached
            catch = pending > 1 or seq.prefilling
            chunk = min(pending, budget) if catch else pending
            if not chunk:
                continue
            if not self._make_room(seq, seq.num_cached + chunk, out):
                continue
            if catch:
                budget -= chunk
            seq.chunk = chunk
            self.blocks.ensure(seq.seq_id, seq.num_cached + chunk)
            out.seqs.append(seq)
        out.num_tokens = sum(s.chunk for s in out.seqs)
        return out

    def _admit(self, out: ScheduledBatch) -> None:
        """Preempted sequences first (oldest admission first), then waiting ones, FIFO: a
        later one never overtakes one that waits for memory (a follower whose leader's prompt
        is not cached yet is passed over, keeping its place)."""
        long_blocked = False  # the long lane's head waits: later long ones wait behind it
        for seq in [*self.preempted, *self.waiting]:
            if len(self.running) >= self.max_batch_size:
                return
            resume = seq in self.preempted
            leader = seq.leader
            if leader is not None and leader.prefilling and not leader.finished:
                continue
            long = self._is_long(seq)
            if long and long_blocked:
                continue
            prefix = self._prefix(seq)
            tokens = max(seq.reserve_tokens, len(prefix) * self.blocks.block_size + 1)
            fits = self.blocks.can_reserve(tokens, prefix)
            if long and self.long_cap is not None:
                fits = fits and self._long_blocks() + self.blocks.blocks_for(tokens) <= self.long_cap
            if not fits:
                if long and self.long_cap is not None:
                    long_blocked = True
                    continue
                return
            if resume:
                self.preempted.remove(seq)
                self.stats.resumed += 1
            else:
                self.waiting.remove(seq)
                seq.admitted = next(self._order)
                if seq.prefix_salt is not None:
                    seq.cached_tokens = len(prefix) * self.blocks.block_size
                    self.stats.prefix_query_tokens += len(seq.prompt_ids)
                    self.stats.prefix_hit_tokens += seq.cached_tokens
            self.blocks.reserve(seq.seq_id, tokens, prefix)
            seq.num_cached = max(seq.num_cached, len(prefix) * self.blocks.block_size)
            if seq.swapped_blocks:
                out.swap_in.append((seq, list(self.blocks.ensure(seq.seq_id, seq.num_cached))))
            self.running.append(seq)
            if not resume and seq.on_admit is not None:
                seq.on_admit()

    def _prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest published prefix, leaving its last known token to
        compute; none while it holds swapped KV or cached tokens of its own."""
        if seq.prefix_salt is None or seq.num_cached or seq.swapped_blocks:
            return []
        full = (seq.num_tokens - 1) // self.blocks.block_size
        return self.blocks.match(block_keys(seq, full, self.blocks.block_size))

    def advance(self, seq: Sequence) -> None:
        """The step computed `seq`'s chunk: count it cached and publish the blocks it filled."""
        bs = self.blocks.block_size
        before = seq.num_cached // bs
        seq.num_cached += seq.chunk
        after = seq.num_cached // bs
        if seq.prefix_salt is None or after == before:
            return
        keys = block_keys(seq, after, bs)
        for i in range(before, after):
            self.blocks.publish(seq.seq_id, i, keys[i])

    def _is_long(self, seq: Sequence) -> bool:
        return self.lanes is not None and self.lanes.is_long(seq.max_total_tokens)

    def _long_blocks(self) -> int:
        """Blocks the long lane holds or was promised."""
        return sum(self.blocks.reserved_for(s.seq_id) for s in self.running if self._is_long(s))

    def _lane_full(self, seq: Sequence, tokens: int) -> bool:
        """Growing long `seq` to `tokens` would take the long lane past its cap."""
        if self.long_cap is None or not self._is_long(seq):
            return False
        return self._long_blocks() + self.blocks.overflow(seq.seq_id, tokens) > self.long_cap

    def _make_room(self, seq: Sequence, tokens: int, out: ScheduledBatch) -> bool:
        """Preempt until `seq` can hold `tokens` tokens (a long one within its lane: another
        long one goes); False when `seq` itself was preempted."""
        while True:
            if not self.blocks.overflow(seq.seq_id, tokens):  # within its reservation
                return True
            lane_full = self._lane_full(seq, tokens)
            if not lane_full and self.blocks.can_grow(seq.seq_id, tokens):
                return True
            pool = [s for s in self.running if self._is_long(s)] if lane_full else self.running
            victim = max(pool, key=lambda s: (s.priority, s.admitted))
            self._preempt(victim, out)
            if victim is seq:
                return False

    def _preempt(self, seq: Sequence, out: ScheduledBatch) -> None:
        """Take `seq` off the batch: its cached blocks to swap space when they fit, else
        drop them (recompute on resume)."""
        self.stats.preemptions += 1
        self._preempted_now.add(seq.seq_id)
        self.running.remove(seq)
        if seq in out.seqs:
            out.seqs.remove(seq)
        seq.chunk = 0
        resuming = next((i for i, (s, _) in enumerate(out.swap_in) if s is seq), None)
        if resuming is not None:  # resumed in this very call: its KV never left swap space
            del out.swap_in[resuming]
            self.stats.resumed -= 1
            self.stats.preemptions -= 1  # the resume is undone, not a new preemption
        else:
            held = self.blocks.blocks(seq.seq_id)[: self.blocks.blocks_for(seq.num_cached)]
            nbytes = len(held) * self.blocks.bytes_per_block
            if held and self.swap_used + nbytes <= self.swap_bytes:
                out.swap_out.append((seq, list(held)))
                self.swap_used += nbytes
                seq.swapped_blocks = len(held)
                self.stats.swapped_out += 1
            else:
                seq.num_cached = 0
                self.stats.recomputed += 1
        self.blocks.release(seq.seq_id)
        self.preempted.append(seq)
        self.preempted.sort(key=lambda s: s.admitted)
