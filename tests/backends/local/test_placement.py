"""Thread placement and malloc thresholds (placement.py), and the event mailbox."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from backends.local import placement
from backends.local.mailbox import Mailbox


def test_default_threads_leave_a_core_to_the_event_loop() -> None:
    assert [placement.default_threads(n) for n in (1, 2, 3, 4, 16)] == [1, 1, 2, 3, 15]


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


def test_apply_sets_torch_threads_process_wide() -> None:
    before = torch.get_num_threads()
    try:
        assert placement.apply(1) == 1
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 1 and seen == [1]  # a new thread sees it too
    finally:
        torch.set_num_threads(before)


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
