"""Plain-Python parts of the engine: stop filter, block manager, scheduler, sampler."""

from __future__ import annotations

import pytest
import torch

from backends.local.block_manager import BlockManager, KVCapacityError
from backends.local.sampler import Sampler
from backends.local.scheduler import Scheduler, Sequence
from backends.local.stop import StopFilter


def run_stop(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    f = StopFilter(stops)
    out = [f.feed(d) for d in deltas]
    out.append(f.flush())
    return out, f.stopped


def test_stop_filter_holds_back_possible_stop_starts() -> None:
    out, stopped = run_stop(["END"], ["ab", "cE", "N", "D", "zzz"])
    assert stopped and "".join(out) == "abc"
    assert out[1] == "c"  # "E" held back
    out, stopped = run_stop(["END"], ["ab", "cE", "Nx"])
    assert not stopped and "".join(out) == "abcENx" and out[2] == "ENx"
    out, stopped = run_stop(["\n\n", "###"], ["a\n", "b##", "c\n", "\nd"])
    assert stopped and "".join(out) == "a\nb##c"
    out, stopped = run_stop([], ["x", "y"])
    assert out == ["x", "y", ""] and not stopped
    out, _ = run_stop(["xy"], ["ax"])  # tail released at the end
    assert "".join(out) == "ax"


def test_block_manager_reserves_and_frees() -> None:
    bm = BlockManager(num_blocks=10, block_size=4, bytes_per_block=100)
    bm.reserve(1, 17)  # 5 blocks
    assert bm.reserved_blocks == 5 and bm.used_blocks == 0
    assert bm.ensure(1, 5) == [0, 1]
    assert not bm.can_reserve(21) and bm.can_reserve(20)
    with pytest.raises(KVCapacityError):
        bm.reserve(2, 21)
    assert bm.can_grow(1, 21) and len(bm.ensure(1, 21)) == 6  # outgrows: an unreserved block
    assert bm.reserved_for(1) == 6 and bm.unreserved_blocks == 4
    bm.reserve(2, 16)  # the rest
    assert not bm.can_grow(1, 25)
    with pytest.raises(KVCapacityError):
        bm.ensure(1, 25)
    bm.release(1)
    bm.release(2)
    assert bm.reserved_blocks == 0 and bm.used_blocks == 0


def test_scheduler_admits_fifo_within_budget() -> None:
    sched = Scheduler(BlockManager(4, 4, 1), max_batch_size=8)
    a = Sequence(1, [1] * 5, max_tokens=3)  # 2 blocks
    b = Sequence(2, [1] * 9, max_tokens=3)  # 3 blocks: must wait
    c = Sequence(3, [1], max_tokens=1)  # fits, but must not overtake b
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq_id for s in batch.seqs] == [1] and batch.num_tokens == 5
    sched.finish(a)
    assert sorted(s.seq_id for s in sched.schedule().seqs) == [2, 3]  # shortest prefill first
    assert sched.cancel(2) is b and sched.blocks.reserved_blocks == 1


def test_sampler_greedy_seeded_and_penalties() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert Sampler(4, temperature=0.0).sample(logits) == 1
    a = [Sampler(4, temperature=1.0, seed=7).sample(logits) for _ in range(1)]
    s1, s2 = Sampler(4, temperature=1.0, seed=7), Sampler(4, temperature=1.0, seed=7)
    seq1 = [s1.sample(logits) for _ in range(30)]
    seq2 = [s2.sample(logits) for _ in range(30)]
    assert seq1 == seq2 and a[0] == seq1[0] and len(set(seq1)) > 1
    top = Sampler(4, temperature=1.0, top_p=0.5, seed=1)
    assert {top.sample(logits) for _ in range(30)} == {1}
    pen = Sampler(4, temperature=0.0, presence_penalty=0.5)
    pen.observe(1)
    assert pen.sample(logits) == 2
    with pytest.raises(ValueError):
        Sampler(4, top_p=0.0)
