"""Thread placement and malloc thresholds (placement.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from backends.local import placement


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
