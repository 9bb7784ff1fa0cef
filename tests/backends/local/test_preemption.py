"""Overcommit with a safety net and prefix sharing, in plain Python: the scheduler admits on
what a sequence is expected to need, preempts the lowest-priority, newest sequence when the
cache runs short, swaps its KV out (or drops it for recompute) and resumes it; sequences of
the same salt share cached prompt blocks. The KV pool is simulated as a dict slot -> (salt,
token), so a property test checks not only the budgets but that every running sequence's
cache holds exactly its own tokens, computed under its own salt, after any number of swaps,
recomputes and shared blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.local.block_manager import BlockManager
from backends.local.scheduler import ScheduledBatch, Scheduler, Sequence
from gateway.core.kv import Lanes

BS = 4  # tokens per block
BPB = 10  # bytes per block


class SimEngine:
    """What the engine does around a schedule, on a fake pool: swap copies, writes, samples."""

    def __init__(self, num_blocks: int, swap_bytes: int, batch: int = 8, prefill: int = 16,
                 lanes: Lanes | None = None) -> None:
        self.bm = BlockManager(num_blocks, BS, BPB)
        self.sched = Scheduler(self.bm, batch, prefill, swap_bytes, lanes)
        self.pool: dict[int, int] = {}
        self.finished: list[int] = []

    def slot(self, seq: Sequence, pos: int) -> int:
        return self.bm.blocks(seq.seq_id)[pos // BS] * BS + pos % BS

    def step(self) -> ScheduledBatch:
        out = self.sched.schedule()
        for seq, blocks in out.swap_out:
            seq.swap = [self.pool.get(b * BS + i) for b in blocks for i in range(BS)]
        for seq, blocks in out.swap_in:
            for j, value in enumerate(seq.swap):
                self.pool[blocks[j // BS] * BS + j % BS] = value
            self.sched.release_swap(seq)
        for seq in out.seqs:
            ids = seq.prompt_ids + seq.output_ids
            sample = seq.samples
            for p in range(seq.num_cached, seq.num_cached + seq.chunk):
                self.pool[self.slot(seq, p)] = (seq.prefix_salt, ids[p])
            self.sched.advance(seq)
            if sample:
                seq.output_ids.append(seq.seq_id * 1000 + 500 + len(seq.output_ids))
                if len(seq.output_ids) >= seq.max_tokens:
                    self.sched.finish(seq)
                    self.finished.append(seq.seq_id)
        return out

    def check(self) -> None:
        bm, sched = self.bm, self.sched
        held = [b for s in sched.running for b in bm.blocks(s.seq_id)]
        for b in set(held):
            assert bm.refs(b) == held.count(b), "a reference count is off"
        for s in sched.running:
            tables = bm.blocks(s.seq_id)
            assert len(tables) == len(set(tables))
            shared = [b for b in tables if bm.refs(b) > 1]
            assert all(b in tables[: s.num_cached // BS] for b in shared), "a shared block is written"
        assert bm.used_blocks == len(set(held)) <= bm.num_blocks
        if sched.long_cap is not None:
            assert sched._long_blocks() <= sched.long_cap
        assert bm.unreserved_blocks >= 0 and bm.reserved_blocks <= bm.num_blocks
        if all(s.prefix_salt is None for s in sched.running):
            assert bm.reserved_blocks == sum(bm.reserved_for(s.seq_id) for s in sched.running)
        assert all(not bm.holds(s.seq_id) for s in sched.queued), "a queued sequence holds blocks"
        assert sched.swap_used == BPB * sum(s.swapped_blocks for s in sched.queued)
        assert 0 <= sched.swap_used <= sched.swap_bytes
        st_ = sched.stats
        assert st_.preemptions == st_.swapped_out + st_.recomputed
        assert st_.preemptions - st_.resumed >= len(sched.preempted)  # (cancels leave)
        for s in sched.running:
            assert s.swapped_blocks == 0 and s.swap is None
            ids = [(s.prefix_salt, t) for t in s.prompt_ids + s.output_ids]
            assert [self.pool[self.slot(s, p)] for p in range(s.num_cached)] == ids[: s.num_cached]
        for s in sched.queued:
            assert (s.swap is not None) == (s.swapped_blocks > 0)
            if s.swapped_blocks:
                assert s.swapped_blocks == bm.blocks_for(s.num_cached)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 24), st.integers(0, 2)),
        st.tuples(st.just("step"), st.integers(1, 8), st.just(0), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0), st.just(0)),
    ),
    min_size=4, max_size=90,
)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(6, 10), st.sampled_from([0, 2 * BPB, 6 * BPB, 1000]),
       st.integers(2, 8), st.integers(1, 20), st.integers(0, 80), st.booleans())
def test_budgets_hold_and_caches_stay_exact_under_preemption(
    ops: list[tuple[str, int, int, int]], num_blocks: int, swap: int, batch: int, prefill: int,
    more_steps: int, lanes: bool,
) -> None:
    sim = SimEngine(num_blocks, swap, batch, prefill, Lanes(12, 0.3) if lanes else None)
    next_id = 0
    for op, a, b, c in ops:
        if op == "add":
            if sim.bm.blocks_for(a + b) <= num_blocks:  # the backend rejects what never fits
                # prompts from two templates, salts of two tenants (one never shares): blocks
                # are shared only where template, length prefix and salt agree
                salt = [b"t0", b"t1", None][c]
                prompt = [(a + c) % 2 * 100 + j for j in range(a)]
                seq = Sequence(next_id, prompt, max_tokens=b, reserve=a + 1, priority=c,
                               prefix_salt=salt)  # expects one token: overcommits
                sim.sched.add(seq)
                if b % 3 == 0:  # and a second choice of the same prompt (n = 2)
                    sim.sched.add(Sequence(next_id + 1, list(prompt), max_tokens=b,
                                           reserve=a + 1, priority=c, prefix_salt=salt,
                                           leader=seq))
                    next_id += 1
                next_id += 1
        elif op == "cancel":
            sim.sched.cancel(a)
        else:
            for _ in range(a):
                out = sim.step()
                assert sum(s.chunk for s in out.seqs if s.catching_up) <= prefill
                assert len(sim.sched.running) <= batch
                sim.check()
        sim.check()
    for _ in range(more_steps):
        sim.step()
        sim.check()
    for s in [*sim.sched.running, *sim.sched.queued]:  # abort everything at this point
        sim.sched.cancel(s.seq_id)
    assert sim.bm.used_blocks == sim.bm.reserved_blocks == sim.sched.swap_used == 0
    assert not sim.sched.has_work()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 14), st.integers(1, 20)), min_size=1, max_size=10),
       st.sampled_from([0, 3 * BPB, 1000]))
def test_every_sequence_finishes_with_its_own_tokens(
    shapes: list[tuple[int, int]], swap: int
) -> None:
    sim = SimEngine(10, swap, batch=4, prefill=8)
    for i, (p, n) in enumerate(shapes):
        sim.sched.add(Sequence(i, [i * 1000 + j for j in range(p)], max_tokens=n, reserve=p + 1))
    for _ in range(2000):
        if not sim.sched.has_work():
            break
        sim.step()
        sim.check()
    assert sorted(sim.finished) == list(range(len(shapes)))
    assert sim.bm.used_blocks == sim.bm.reserved_blocks == sim.sched.swap_used == 0


def test_victim_is_lowest_priority_then_newest_and_resumes_first() -> None:
    sim = SimEngine(6, swap_bytes=1000, batch=8, prefill=64)
    old_low = Sequence(1, [1] * 4, max_tokens=20, reserve=5, priority=2)
    high = Sequence(2, [2] * 4, max_tokens=20, reserve=5, priority=0)
    new_low = Sequence(3, [3] * 4, max_tokens=20, reserve=5, priority=2)
    normal = Sequence(4, [4] * 4, max_tokens=20, reserve=5, priority=1)
    for s in (old_low, high, new_low, normal):
        sim.sched.add(s)
    sim.step()  # 4 admitted with 2 blocks each: 8 > 6 blocks, so no, only 3 fit
    assert [s.seq_id for s in sim.sched.running] == [1, 2, 3] and list(sim.sched.waiting) == [normal]
    preempted: list[int] = []
    while not preempted:
        out = sim.step()
        preempted = [s.seq_id for s, _ in out.swap_out]
        sim.check()
    assert preempted == [3], "the newest of the lowest priority goes first"
    assert sim.sched.stats.swapped_out == 1 and sim.sched.stats.recomputed == 0
    assert sim.sched.preempted == [new_low] and not new_low.finished
    while sim.sched.preempted or normal in sim.sched.waiting:
        sim.step()
        sim.check()
        if normal in sim.sched.running:
            assert new_low not in sim.sched.preempted, "a preempted sequence resumes first"
    for _ in range(200):
        if not sim.sched.has_work():
            break
        sim.step()
        sim.check()
    assert sorted(sim.finished) == [1, 2, 3, 4] and sim.sched.stats.resumed >= 1


def test_swap_full_recomputes_and_worst_case_never_preempts() -> None:
    sim = SimEngine(4, swap_bytes=0, batch=8, prefill=64)
    for i in range(3):
        sim.sched.add(Sequence(i, [i * 1000 + j for j in range(3)], max_tokens=9, reserve=4))
    for _ in range(200):
        if not sim.sched.has_work():
            break
        sim.step()
        sim.check()
    stats = sim.sched.stats
    assert sorted(sim.finished) == [0, 1, 2]
    assert stats.preemptions == stats.recomputed > 0 and stats.swapped_out == 0
    reserve_all = SimEngine(4, swap_bytes=1000, batch=8, prefill=64)
    for i in range(3):  # no `reserve`: prompt + max_tokens, 3 blocks each: one at a time
        reserve_all.sched.add(Sequence(i, [i * 1000 + j for j in range(3)], max_tokens=9))
    for _ in range(200):
        if not reserve_all.sched.has_work():
            break
        reserve_all.step()
        reserve_all.check()
        assert len(reserve_all.sched.running) <= 1
    assert sorted(reserve_all.finished) == [0, 1, 2] and reserve_all.sched.stats.preemptions == 0


def test_lanes_keep_a_share_for_short_sequences() -> None:
    sim = SimEngine(10, swap_bytes=0, batch=16, prefill=64, lanes=Lanes(12, 0.3))
    assert sim.sched.long_cap == 7
    for i in range(4):  # long: 20 + 8 tokens, 7 blocks each
        sim.sched.add(Sequence(i, [i * 1000 + j for j in range(20)], max_tokens=8))
    short = Sequence(9, [9000, 9001], max_tokens=6)  # 8 tokens: short
    sim.sched.add(short)
    sim.step()
    assert [s.seq_id for s in sim.sched.running] == [0, 9]  # it passes three long ones
    for _ in range(200):
        if not sim.sched.has_work():
            break
        sim.step()
        sim.check()
        assert sum(s.seq_id < 9 for s in sim.sched.running) <= 1
    assert sorted(sim.finished) == [0, 1, 2, 3, 9] and sim.finished.index(9) < 2
