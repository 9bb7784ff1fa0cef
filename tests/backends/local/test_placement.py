"""Thread placement and malloc thresholds (placement.py), and the event mailbox."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from backends.hf.tokenizer import ChatTokenizer
from backends.local import placement
from backends.local.engine import Engine, Event
from backends.local.loader import load_checkpoint
from backends.local.mailbox import Mailbox
from backends.local.sampler import Sampler

from .conftest import TinyCheckpoint


def test_default_threads_take_two_cores_and_leave_one_of_more() -> None:
    assert [placement.default_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 2, 2, 3, 15]


def test_cores_are_shared_among_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    online = len(placement.os.sched_getaffinity(0))
    monkeypatch.setenv("GATEWAY_WORKERS", "1")
    assert placement.cores() == online
    monkeypatch.setenv("GATEWAY_WORKERS", str(online * 2))
    assert placement.cores() == 1


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (None, None), ("", None),
                                                 ("3", 3), (2, 2)])
def test_parse_threads(value: object, expected: int | None) -> None:
    assert placement.parse_threads(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "many", True, 1.5])
def test_parse_threads_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="torch_threads"):
        placement.parse_threads(value)


def test_resolve_prefers_explicit_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(placement.ENV, "3")
    assert placement.resolve_threads(2) == 2
    assert placement.resolve_threads() == 3
    monkeypatch.setenv(placement.ENV, "auto")
    cores = len(placement.os.sched_getaffinity(0))
    assert placement.resolve_threads() == placement.default_threads(cores)
    with pytest.raises(ValueError):
        placement.resolve_threads(0)


def test_claims_keep_every_engine_team_within_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "cores", lambda: 4)
    monkeypatch.setattr(placement, "_claims", {})
    monkeypatch.delenv(placement.ENV, raising=False)
    big = placement.claim(owner="big")
    assert big.threads == 3  # the default for 4 cores: 2 workers
    again = placement.claim(owner="big")  # its replacement on a reload: the same, no more
    assert again.threads == 3 and placement.workers_claimed() == 2
    small = placement.claim(2, owner="small")
    assert small.threads == 2  # the last worker
    assert placement.claim(4).threads == 1  # none left: an engine that computes on its thread
    placement.release(big)
    assert placement.workers_claimed() == 3  # the replacement still holds big's threads
    placement.release(again)
    placement.release(small)
    assert placement.claim(8, owner="x").threads == 4  # capped: 3 workers beside the first
    placement.release(placement.Claim("x", 4))
    assert placement.workers_claimed() == 0


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def test_engine_thread_takes_its_team_and_other_threads_compute_on_one(
    tiny_checkpoint: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine thread computes with the threads it claimed; every thread started after it,
    which lazily takes torch's default, gets one, so no second OpenMP team joins the process
    (libgomp's barriers stop spinning once workers outnumber the cores: placement.py)."""
    monkeypatch.setattr(placement, "cores", lambda: 2)
    monkeypatch.setattr(placement, "_claims", {})
    monkeypatch.delenv(placement.ENV, raising=False)
    loaded = load_checkpoint(tiny_checkpoint.model_dir, "float32", "cpu")
    second = Engine(loaded.model, 1 << 20, max_batch_size=2, num_threads=1)
    engine = Engine(loaded.model, 1 << 20, max_batch_size=2)  # the default: 2 on 2 cores
    second.start()
    engine.start()  # last: torch's default would be its 2 had start not put it back to 1
    try:
        assert (engine.num_threads, second.num_threads) == (2, 1)
        done = threading.Semaphore(0)
        tokens: list[int] = []

        def emit(ev: Event) -> None:
            assert ev.error is None
            if ev.finish_reason is not None:
                tokens.append(ev.completion_tokens)
                done.release()

        tok = ChatTokenizer.from_dir(tiny_checkpoint.model_dir, loaded.config.eos_token_ids)
        for e in (engine, second):
            ids = tok.encode("Hello world")
            e.submit(ids, 3, Sampler(loaded.config.vocab_size, 0.0), tok.detokenizer(ids), emit)
        done.acquire()
        done.acquire()
        assert tokens == [3, 3]  # the engine's team exists now

        before = tasks()
        seen: list[int] = []
        counted, go_on = threading.Event(), threading.Event()

        def other() -> None:
            torch.ones(1 << 22).mul_(2.0)  # a parallel op: a team if this thread had threads
            seen.append(torch.get_num_threads())
            counted.set()
            go_on.wait()

        t = threading.Thread(target=other, daemon=True)
        t.start()
        counted.wait()
        try:
            assert seen == [1] and tasks() == before + 1  # the thread itself, no OpenMP worker
        finally:
            go_on.set()
            t.join()
        assert torch.get_num_threads() == 1  # and the thread that started the engine
    finally:
        engine.stop()
        second.stop()
    assert placement.workers_claimed() == 0  # released with the threads that held them


@pytest.mark.parametrize(("current", "granted", "cores", "others", "expected"), [
    (2, 2, 2, 0.0, 2), (2, 2, 2, 0.3, 2), (2, 2, 2, 0.6, 1), (2, 2, 2, 2.5, 1),
    (1, 2, 2, 0.5, 1), (1, 2, 2, 0.2, 2), (1, 2, 2, 1.0, 1),  # hysteresis: back at <= 0.25
    (15, 15, 16, 0.2, 15), (15, 15, 16, 4.0, 12), (12, 15, 16, 0.5, 15), (12, 15, 16, 3.8, 12),
])
def test_decide_gives_the_cores_others_leave(
    current: int, granted: int, cores: int, others: float, expected: int
) -> None:
    assert placement.decide(current, granted, cores, others) == expected


class ProcStat:
    """Scripted /proc/stat and /proc/self/stat: busy ticks per core, and this process's."""

    def __init__(self) -> None:
        self.busy = {0: 0, 1: 0, 2: 0}  # user ticks of each core
        self.own = 0  # this process's utime + stime ticks
        self.now = 1000.0

    def read(self) -> tuple[str, str]:
        cores = "".join(f"cpu{i} {b} 0 0 9999 0 0 0 0 0 0\n" for i, b in self.busy.items())
        total = sum(self.busy.values())
        own = "1 (python (x)) R " + " ".join(["0"] * 10) + f" {self.own} 0 " + "0 " * 20
        return f"cpu  {total} 0 0 0 0 0 0 0 0 0\n{cores}", own


def test_contention_counts_another_process_cpu_not_ours() -> None:
    proc = ProcStat()
    c = placement.Contention(interval=0.5, read=proc.read, clock=lambda: proc.now, cpus=[0, 1])
    tick = c.tick
    proc.busy[0] += tick // 2 + tick  # 0.5 s of another process's CPU and 1 s of ours ...
    proc.own += tick
    proc.busy[2] += 5 * tick  # ... and a core this process may not run on, which must not count
    assert c.others() is None  # the interval has not passed
    proc.now += 2.0
    others = c.others()
    assert others is not None and c.window == 2.0
    assert others * c.window == pytest.approx(0.5, abs=1 / tick)  # CPU-seconds, not ours
    proc.busy[1] += 3 * tick
    c.restart()  # what another process did before now is not counted
    proc.now += 1.0
    assert c.others() == 0.0
    proc.own += 2 * tick
    proc.busy[1] += tick  # ours counted in the core's busy time but more than it: never below 0
    proc.now += 1.0
    assert c.others() == 0.0


def test_contention_reads_this_machines_counters() -> None:
    c = placement.Contention(interval=0.0)
    if c._last is None:
        pytest.skip("no /proc on this system")
    others = c.others()
    assert others is not None and others >= 0.0 and c.window > 0


def test_resize_keeps_new_threads_on_one() -> None:
    seen: dict[str, int] = {}

    def engine_thread() -> None:
        placement.enter_engine_thread(1)
        seen["grown"] = placement.resize_engine_thread(2)
        t = threading.Thread(target=lambda: seen.setdefault("new", torch.get_num_threads()))
        t.start()
        t.join()
        seen["still"] = torch.get_num_threads()
        seen["shrunk"] = placement.resize_engine_thread(1)

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == {"grown": 2, "new": 1, "still": 2, "shrunk": 1}


def test_engine_shrinks_its_team_while_others_hold_cores(
    tiny_checkpoint: TinyCheckpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    readings = [1.5, None, 0.1]  # a neighbour takes 1.5 cores, then leaves them
    restarts: list[int] = []

    class Scripted:
        def __init__(self) -> None:
            self.cpus = [0, 1]

        def others(self) -> float | None:
            return readings.pop(0) if readings else None

        def restart(self) -> None:
            restarts.append(len(readings))

    monkeypatch.setattr(placement, "cores", lambda: 2)
    monkeypatch.setattr(placement, "_claims", {})
    monkeypatch.setattr(placement, "Contention", Scripted)
    loaded = load_checkpoint(tiny_checkpoint.model_dir, "float32", "cpu")
    engine = Engine(loaded.model, 1 << 20, max_batch_size=2, num_threads=2)
    engine.start()
    try:
        done = threading.Semaphore(0)
        threads: list[int] = []

        def emit(ev: Event) -> None:
            threads.append(engine.num_threads)
            if ev.finish_reason is not None or ev.error is not None:
                done.release()

        tok = ChatTokenizer.from_dir(tiny_checkpoint.model_dir, loaded.config.eos_token_ids)
        ids = tok.encode("Hello world")
        engine.submit(ids, 6, Sampler(loaded.config.vocab_size, 0.0), tok.detokenizer(ids), emit)
        done.acquire()
        assert engine.thread_changes == 2 and engine.num_threads == 2  # 2 -> 1 -> 2
        assert restarts == [3]  # a window restarts when work arrives after idling
        assert 1 in threads  # some steps ran on one thread
        assert torch.get_num_threads() == 1
    finally:
        engine.stop()


def test_mailbox_delivers_in_order_with_one_wake_up_per_batch() -> None:
    async def main() -> tuple[list[int], list[int]]:
        box: Mailbox[int] = Mailbox(asyncio.get_running_loop())
        q: asyncio.Queue[int] = asyncio.Queue()
        wakeups: list[int] = []
        deliver = box._deliver

        def counted() -> None:
            wakeups.append(q.qsize())
            deliver()

        box._deliver = counted  # type: ignore[method-assign]

        def engine(first: int) -> None:
            for i in range(first, first + 50):
                box.post(q, i)

        for first in (0, 50):  # two engine steps
            t = threading.Thread(target=engine, args=(first,))
            t.start()
            t.join()  # blocks the loop: every post of the step waits for one wake-up
            await asyncio.sleep(0)
        return [q.get_nowait() for _ in range(q.qsize())], wakeups

    got, wakeups = asyncio.run(main())
    assert got == list(range(100))
    assert wakeups == [0, 50]  # one delivery per step, the second after the first's 50


def test_mailbox_raises_once_the_loop_is_closed() -> None:
    loop = asyncio.new_event_loop()
    box: Mailbox[int] = Mailbox(loop)
    loop.close()
    q: asyncio.Queue[int] = asyncio.Queue()
    with pytest.raises(RuntimeError):
        box.post(q, 1)
    with pytest.raises(RuntimeError):
        box.post(q, 2)  # still raising: the engine drops the sequence
