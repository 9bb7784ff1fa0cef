"""Property tests of the scheduler and block manager under random workloads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.local.block_manager import BlockManager
from backends.local.scheduler import Scheduler, Sequence

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 70), st.integers(1, 30)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 40), st.just(0)),
    ),
    max_size=80,
)


def check_invariants(sched: Scheduler, bm: BlockManager) -> None:
    tables = {s.seq_id: bm.blocks(s.seq_id) for s in sched.running}
    allocated = [b for blocks in tables.values() for b in blocks]
    assert len(allocated) == len(set(allocated)), "a block is held twice"
    assert bm.used_blocks == len(allocated) <= bm.num_blocks
    assert bm.reserved_blocks == sum(bm.reserved_for(i) for i in tables) <= bm.num_blocks
    for s in sched.running:
        assert len(tables[s.seq_id]) <= bm.reserved_for(s.seq_id)
        assert len(tables[s.seq_id]) * bm.block_size >= s.num_cached
    assert bm.num_blocks - bm.used_blocks >= bm.reserved_blocks - bm.used_blocks


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(4, 24), st.integers(1, 6), st.integers(1, 40))
def test_random_workloads_never_over_allocate(
    ops: list[tuple[str, int, int]], num_blocks: int, batch: int, prefill: int
) -> None:
    bm = BlockManager(num_blocks, block_size=4, bytes_per_block=1)
    sched = Scheduler(bm, max_batch_size=batch, max_prefill_tokens=prefill)
    next_id = 0
    for op, a, b in ops:
        if op == "add":
            if bm.blocks_for(a + b) <= num_blocks:  # the backend rejects what never fits
                sched.add(Sequence(next_id, [7] * a, max_tokens=b))
                next_id += 1
        elif op == "cancel":
            sched.cancel(a)
        else:
            out = sched.schedule()
            prefill_tokens = sum(s.chunk for s in out.seqs if s.prefilling)
            assert prefill_tokens <= prefill
            assert len(sched.running) <= batch
            for s in out.seqs:  # what the engine does after the forward
                s.num_cached += s.chunk
                if not s.prefilling:
                    s.output_ids.append(1)
                    if len(s.output_ids) >= s.max_tokens:
                        sched.finish(s)
        check_invariants(sched, bm)
    for s in [*sched.running, *sched.waiting]:
        sched.cancel(s.seq_id)
    assert bm.used_blocks == 0 and bm.reserved_blocks == 0 and not sched.has_work()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_everything_finishes_and_frees(lengths: list[int]) -> None:
    bm = BlockManager(16, block_size=4, bytes_per_block=1)
    sched = Scheduler(bm, max_batch_size=3, max_prefill_tokens=8)
    for i, n in enumerate(lengths):
        sched.add(Sequence(i, [1] * n, max_tokens=3))
    finished: list[int] = []
    for _ in range(500):
        if not sched.has_work():
            break
        for s in sched.schedule().seqs:
            s.num_cached += s.chunk
            if not s.prefilling:
                s.output_ids.append(1)
                if len(s.output_ids) == s.max_tokens:
                    sched.finish(s)
                    finished.append(s.seq_id)
        check_invariants(sched, bm)
    assert sorted(finished) == list(range(len(lengths)))
    assert bm.used_blocks == bm.reserved_blocks == 0


def test_long_prompt_does_not_stall_short_ones() -> None:
    bm = BlockManager(64, block_size=4, bytes_per_block=1)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=16)
    decoding = Sequence(1, [1] * 3, max_tokens=20)
    sched.add(decoding)
    for s in sched.schedule().seqs:
        s.num_cached += s.chunk
        s.output_ids.append(1)
    long = Sequence(2, [1] * 160, max_tokens=4)  # 160 prompt tokens: 10+ steps of prefill
    late = Sequence(3, [1] * 2, max_tokens=4)  # a short prompt behind the long one
    sched.add(long)
    sched.add(late)
    steps = 0
    while long.prefilling:
        out = sched.schedule()
        assert sum(s.chunk for s in out.seqs if s.prefilling) <= 16
        assert decoding in out.seqs and decoding.chunk == 1  # decode never waits
        for s in out.seqs:
            s.num_cached += s.chunk
            if not s.prefilling:
                s.output_ids.append(1)
                if len(s.output_ids) == s.max_tokens:
                    sched.finish(s)
        steps += 1
        if steps == 1:
            assert late.output_ids == [1], "the short prompt got its first token at once"
    assert steps == 11 and len(decoding.output_ids) == 12
