"""The generation loop: one dedicated thread that schedules, runs the model, and streams text.

Callers (the asyncio side) talk to it only through `submit` and `abort`, which are thread-safe,
and receive `Event`s through the `emit` callback they pass (typically a
`loop.call_soon_threadsafe` into a queue). Each step runs all running sequences in one flat
batch (continuous batching); torch releases the GIL while it computes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backends.hf.tokenizer import Detokenizer
from backends.local import placement
from backends.local.block_manager import BlockManager
from backends.local.memory_plan import KVLayout
from backends.local.model import Llama
from backends.local.runner import ModelRunner
from backends.local.sampler import Sampler
from backends.local.scheduler import Scheduler, Sequence
from backends.local.stop import StopFilter
from backends.local.workspace import WorkspaceMeter
from gateway.core.kv import Lanes, kv_bytes_per_token

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What the engine tells a request: a text delta, its end, or its failure."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0  # tokens generated so far (all of them, on the last event)
    kv_peak_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (on the last event)
    kv_peak_share_bytes: int = 0  # kv_peak_bytes with a block k sequences share counted 1/k
    queue_seconds: float = 0.0
    workspace_bytes: int = 0  # the request's largest share of a step's workspace
    error: BaseException | None = None


class EngineClosed(RuntimeError):
    """The engine stopped before the request finished."""


@dataclass
class SeqState:
    sampler: Sampler
    detok: Detokenizer
    stop: StopFilter
    eos_ids: frozenset[int]
    emit: Callable[[Event], None]
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    workspace_peak: int = 0
    carry: str = ""  # text of tokens forced before the first step, sent with the first event


class Engine:
    def __init__(
        self,
        model: Llama,
        kv_cache_bytes: int,
        max_batch_size: int = 32,
        block_size: int = 16,
        device: str = "cpu",
        num_threads: int | None = None,
        max_prefill_tokens: int = 512,
        swap_bytes: int = 0,
        kv_dtype: str = "auto",
        lanes: Lanes | None = None,
        owner: str | None = None,
        jump_forward: bool = True,
    ) -> None:
        cfg = model.config
        self.model = model
        self.device = torch.device(device)
        self.dtype = model.compute_dtype
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = kv_bytes_per_token(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, elem, kv_dtype
        )
        self.layout = KVLayout.from_budget(per_token, block_size, kv_cache_bytes)
        self.bytes_per_token = per_token
        self.block_size = block_size
        self.blocks = BlockManager(self.layout.num_blocks, block_size, self.layout.bytes_per_block)
        self.scheduler = Scheduler(self.blocks, max_batch_size, max_prefill_tokens, swap_bytes,
                                   lanes)
        self.workspace = WorkspaceMeter(cfg, elem, model, block_size)
        self.runner = ModelRunner(model, self.blocks, self.device, kv_dtype)
        self.requested_threads = num_threads  # None: MEMGATE_TORCH_THREADS or the default
        self.owner = owner  # the backend: its replacement on a reload shares its threads
        self.num_threads = 0  # set by start: torch threads of the engine thread (placement.py)
        self._claim: placement.Claim | None = None  # released once the thread has ended
        self.thread_changes = 0  # team resizes under contention (placement.Contention)
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.jump_forward = jump_forward  # append the tokens a grammar forces without sampling
        self.tokens_forced = 0
        self.last_error: BaseException | None = None

    # ---- thread-safe API -------------------------------------------------------------------

    @property
    def kv_bytes_total(self) -> int:
        return self.blocks.num_blocks * self.blocks.bytes_per_block

    @property
    def kv_bytes_used(self) -> int:
        return self.blocks.used_blocks * self.blocks.bytes_per_block

    @property
    def kv_bytes_reserved(self) -> int:
        return self.blocks.reserved_blocks * self.blocks.bytes_per_block

    @property
    def kv_bytes_swapped(self) -> int:
        """Host bytes holding the KV of preempted sequences (within swap_bytes)."""
        return self.scheduler.swap_used

    def kv_bytes_for(self, tokens: int) -> int:
        return self.layout.kv_bytes_for(tokens)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        claim = placement.claim(self.requested_threads, self.owner)
        placement.tune_malloc()
        try:
            self.runner.allocate()
        except BaseException:
            placement.release(claim)
            raise
        self._claim = claim
        entered = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(claim.threads, entered),
                                        name="local-engine", daemon=True)
        self._thread.start()
        entered.wait()
        placement.restore_default()  # threads started from now on compute on one thread

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still in flight get an EngineClosed error event."""
        if self._thread is None:
            return
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        if not self._thread.is_alive() and self._claim is not None:
            placement.release(self._claim)  # its OpenMP team ended with it
            self._claim = None

    def submit(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampler: Sampler,
        detok: Detokenizer,
        emit: Callable[[Event], None],
        stop: list[str] | None = None,
        eos_ids: frozenset[int] = frozenset(),
        adapter_slot: int = 0,
        reserve_tokens: int | None = None,
        priority: int = 1,
        prefix_salt: bytes | None = None,
        follows: int | None = None,
        wrapper_tokens: int = 0,
    ) -> int:
        """Queue a sequence. `reserve_tokens`: KV tokens reserved at admission (prompt + the
        expected output; None: prompt + max_tokens, nothing is ever preempted for it);
        `priority`: 0 high .. 2 low, who is preempted first when the cache runs short;
        `prefix_salt`: shares cached prompt blocks with sequences of the same salt (None:
        never); `follows`: a sequence submitted before with the same prompt (n > 1) whose
        prompt blocks this one waits for and shares; `wrapper_tokens`: forced tokens of a
        tool call's wrapper taken on top of `max_tokens` (docs/engine.md "Jump-forward decoding"),
        which `reserve_tokens` includes."""
        if not self.alive:
            raise EngineClosed("engine is not running")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        state = SeqState(sampler, detok, StopFilter(stop or []), eos_ids, emit)
        seq = Sequence(next(self._ids), list(prompt_ids), max_tokens, adapter_slot, state=state,
                       reserve=reserve_tokens, priority=priority, prefix_salt=prefix_salt,
                       wrapper_tokens=max(0, wrapper_tokens))
        self._inbox.put(("add", (seq, follows)))
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        self._inbox.put(("abort", seq_id))

    # ---- engine thread -------------------------------------------------------------------

    def _run(self, threads: int, entered: threading.Event) -> None:
        try:
            self.num_threads = placement.enter_engine_thread(threads)
        finally:
            entered.set()
        contention = (placement.Contention() if self.device.type == "cpu" and threads > 1
                      else None)
        try:
            with torch.inference_mode():
                idle = True
                while self._drain(block=not self.scheduler.has_work()):
                    if self.scheduler.has_work():
                        if idle and contention is not None:
                            contention.restart()  # what others did while it idled is past
                        idle = False
                        self._step()
                        if contention is not None:
                            self._place(contention, threads)
                    else:
                        idle = True
        except BaseException as e:  # the loop itself broke: fail everyone below
            self.last_error = e
            log.exception("local engine loop failed")
        finally:
            self._fail_all(EngineClosed("engine stopped"))

    def _place(self, contention: placement.Contention, granted: int) -> None:
        """Between steps: fewer threads while other processes hold part of the cores, the
        granted ones again once they leave them (placement.decide)."""
        others = contention.others()
        if others is None:
            return
        want = placement.decide(self.num_threads, granted, len(contention.cpus), others)
        if want != self.num_threads:
            log.info("local engine threads %d -> %d: other processes used %.2f of %d cores",
                     self.num_threads, want, others, len(contention.cpus))
            self.num_threads = placement.resize_engine_thread(want)
            self.thread_changes += 1

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        try:
            cmd, arg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd == "stop":
                return False
            if cmd == "add" and isinstance(arg, tuple):
                seq, follows = arg
                if follows is not None:
                    seq.leader = self.scheduler.find(follows)
                _, seq.state.carry = self._jump(seq, first=True)  # sent with its first token
                self.scheduler.add(seq)
            elif cmd == "abort" and isinstance(arg, int):
                self.scheduler.cancel(arg)
            try:
                cmd, arg = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _fail_all(self, error: BaseException) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.queued]:
            self.scheduler.finish(seq)
            self._send(seq, Event(error=error))

    def _send(self, seq: Sequence, event: Event) -> None:
        try:
            seq.state.emit(event)
        except RuntimeError:  # the caller's event loop is gone; drop the sequence
            seq.cancelled = True

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        for seq, blocks in batch.swap_out:  # before anything writes the blocks they freed
            seq.swap = self.runner.copy_out(blocks)
        for seq, blocks in batch.swap_in:
            self.runner.copy_in(blocks, seq.swap)
            self.scheduler.release_swap(seq)
        if not batch.seqs:
            return
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.state.admitted_at is None:
                seq.state.admitted_at = now
        shares = self.workspace.record([(s.chunk, s.num_cached + s.chunk) for s in batch.seqs])
        for seq, share in zip(batch.seqs, shares, strict=True):
            seq.state.workspace_peak = max(seq.state.workspace_peak, share)
        try:
            logits, sampled = self.runner.run(batch.seqs)
            greedy = logits.argmax(dim=-1).tolist() if sampled else []
        except Exception as e:
            log.exception("local engine step failed")
            for seq in batch.seqs:
                self.scheduler.finish(seq)
                self._send(seq, Event(error=e))
            return
        self.steps += 1
        for seq in batch.seqs:
            self.scheduler.advance(seq)
            if seq.cancelled:
                self.scheduler.finish(seq)
        for i, seq in enumerate(sampled):  # a chunk that ends the prompt yields the first token
            if seq.finished:
                continue
            try:
                self._advance(seq, logits[i], greedy[i])
            except Exception as e:  # one sequence's failure never stops the engine
                log.exception("local engine: sequence %s failed", seq.seq_id)
                self.scheduler.finish(seq)
                self._send(seq, Event(error=e))

    def _advance(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> None:
        st: SeqState = seq.state
        token = argmax if st.sampler.plain_greedy else st.sampler.sample(logits)
        st.sampler.observe(token)
        reason, text = self._take(seq, token)
        text, st.carry = st.carry + text, ""
        if reason is None and not seq.cancelled:
            reason, more = self._jump(seq)
            text += more
        if seq.cancelled:
            self.scheduler.finish(seq)
            return
        if reason is None:
            if text:
                self._send(seq, Event(text=text, completion_tokens=len(seq.output_ids)))
            return
        text += st.stop.flush()
        held = self.blocks.blocks(seq.seq_id)
        peak = len(held) * self.blocks.bytes_per_block
        share = round(sum(self.blocks.bytes_per_block / self.blocks.refs(b) for b in held))
        self.scheduler.finish(seq)
        admitted = st.admitted_at if st.admitted_at is not None else st.submitted_at
        self._send(
            seq,
            Event(
                text=text,
                finish_reason=reason,
                completion_tokens=len(seq.output_ids),
                kv_peak_bytes=peak,
                cached_tokens=seq.cached_tokens,
                kv_peak_share_bytes=share,
                queue_seconds=admitted - st.submitted_at,
                workspace_bytes=st.workspace_peak,
            ),
        )

    def _jump(self, seq: Sequence, first: bool = False) -> tuple[str | None, str]:
        """Jump-forward: the tokens the grammar forces are appended now, without a step
        each; the next step computes them as a chunk (like a prompt's) and samples after
        them. `first` (before the prompt's step): never the token that would end it."""
        if not self.jump_forward:
            return None, ""
        st: SeqState = seq.state
        text = ""
        for forced, wrapper in st.sampler.forced():
            free = wrapper and seq.wrapper_taken < seq.wrapper_tokens
            if first and not free and seq.counted_tokens + 1 >= seq.max_tokens:
                break
            if not st.sampler.force(forced):
                break  # the text's own tokenization is not the grammar's: sample instead
            seq.wrapper_taken += int(free)
            self.tokens_forced += 1
            reason, more = self._take(seq, forced)
            text += more
            if reason is not None:
                return reason, text
        return None, text

    def _take(self, seq: Sequence, token: int) -> tuple[str | None, str]:
        """Append `token` (sampled or forced): its text, and the finish reason it causes."""
        st: SeqState = seq.state
        seq.output_ids.append(token)
        self.tokens_generated += 1
        if token in st.eos_ids:
            return "stop", st.stop.feed(st.detok.flush())
        text = st.stop.feed(st.detok.push(token))
        if st.stop.stopped:
            return "stop", text
        if seq.counted_tokens >= seq.max_tokens:
            text += st.stop.feed(st.detok.flush())
            return ("stop" if st.stop.stopped else "length"), text
        return None, text
