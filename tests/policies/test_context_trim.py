"""context_trim: exact counts, system prompt and last user message kept, strategies."""

from __future__ import annotations

import pytest

from gateway.core.context import RequestContext
from gateway.core.errors import ContextLengthExceeded
from policies.context_trim import ContextTrim, drop_oldest, middle_out
from tests.policies.fakes import ctx, make, settings


def chat(turns: int, words: int = 10) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        out += [{"role": "user", "content": f"q{i} " + "w " * words},
                {"role": "assistant", "content": f"a{i} " + "w " * words}]
    return [*out, {"role": "user", "content": "last question"}]


def trim(strategy: str = "drop_oldest", **limits: object) -> ContextTrim:
    tenant = {"name": "acme", "trim": {"strategy": strategy, "fit_kv_share": bool(limits)},
              "limits": limits}
    return make(ContextTrim, settings([tenant]))


def firsts(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"].split()[0] for m in messages]


async def test_fits_untouched() -> None:
    c = ctx(messages=chat(2), max_tokens=16)
    d = await trim().apply(c)
    assert d.action == "pass" and c.trimmed_tokens == 0 and len(c.messages or []) == 6
    assert c.prompt_tokens == 4 + 4 * 13 + 4  # system, two turns, last question


async def test_drop_oldest_keeps_system_and_newest_turns() -> None:
    c = ctx(messages=chat(20), max_tokens=156)  # window 256 -> 100 prompt tokens
    d = await trim().apply(c)
    assert d.action == "modify"
    kept = firsts(c.messages or [])
    assert kept[0] == "be" and kept[-1] == "last"
    assert kept[1:-1] == ["q14", "a14", "q15", "a15", "q16", "a16", "q17", "a17", "q18", "a18",
                          "q19", "a19"][-len(kept) + 2:]
    assert (c.prompt_tokens or 0) <= 100 < (c.prompt_tokens or 0) + 26  # the most that fit
    assert c.trimmed_tokens == 4 + 40 * 13 + 4 - (c.prompt_tokens or 0)


async def test_middle_out_keeps_the_first_turn() -> None:
    c = ctx(messages=chat(20), max_tokens=156)
    await trim("middle_out").apply(c)
    kept = firsts(c.messages or [])
    assert kept[:3] == ["be", "q0", "a0"] and kept[-3:] == ["q19", "a19", "last"]
    assert "q10" not in kept and (c.prompt_tokens or 0) <= 100


async def test_last_user_message_alone_too_long_is_400() -> None:
    long = [{"role": "system", "content": "s"}, {"role": "user", "content": "w " * 300}]
    with pytest.raises(ContextLengthExceeded) as info:
        await trim().apply(ctx(messages=long, max_tokens=16))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    with pytest.raises(ContextLengthExceeded):
        await trim("none").apply(ctx(messages=chat(20), max_tokens=16))


async def test_trims_further_to_the_tenant_kv_share() -> None:
    # share 0.25 of 64 blocks x 16 tokens = 256 tokens; minus max_tokens 200 -> 56 prompt tokens
    c = ctx(messages=chat(20), max_tokens=200)
    t = trim(max_kv_share=0.25)
    t.env.backends["big"].window = 4096
    await t.apply(c)
    assert (c.prompt_tokens or 0) <= 56 and c.trimmed_tokens > 0


def test_candidates_start_at_user_messages() -> None:
    msgs = chat(3)
    for cands in (drop_oldest(msgs), middle_out(msgs)):
        for keep in cands:
            roles = [msgs[i]["role"] for i in keep if msgs[i]["role"] != "system"]
            assert roles[0] == "user" and keep[-1] == len(msgs) - 1
        assert cands[-1] == [0, len(msgs) - 1]


def _reference(messages: list[dict[str, str]], middle: bool) -> list[list[int]]:
    """The strategies as they were first written (every candidate as a list, quadratic):
    the lazy candidates must equal them."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages))
    droppable = [i for i, m in enumerate(messages[:last_user]) if m["role"] not in ("system", "developer")]
    kept = [i for i in range(len(messages)) if i not in droppable]
    starts = [k for k, i in enumerate(droppable) if messages[i]["role"] == "user"] + [len(droppable)]
    if not middle or len(starts) < 3:
        return [sorted(kept + droppable[k:]) for k in starts]
    first = droppable[: starts[1]]
    return [*(sorted(kept + first + droppable[k:]) for k in starts[1:]), sorted(kept)]


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 7])
def test_lazy_candidates_equal_the_reference(turns: int) -> None:
    msgs = chat(turns)
    msgs.insert(3, {"role": "developer", "content": "d"})  # kept wherever it stands
    for fn, middle in ((drop_oldest, False), (middle_out, True)):
        assert list(fn(msgs)) == _reference(msgs, middle)
        cands = fn(msgs)
        assert [cands[k] for k in range(-len(cands), 0)] == _reference(msgs, middle)


async def test_trimming_a_long_chat_counts_a_few_candidates() -> None:
    for strategy in ("drop_oldest", "middle_out"):
        await _trims_a_long_chat(strategy)


async def _trims_a_long_chat(strategy: str) -> None:
    """2,000 turns: the answer is the same as checking every candidate in order, found with
    O(log n) counts (gallop from the fewest kept, then bisect)."""
    msgs = chat(2000, words=3)
    t = trim(strategy)
    backend = t.env.backends["big"]
    seen: list[int] = []  # messages rendered per count
    counter = backend.count_tokens

    def count_tokens(c: RequestContext) -> int | None:
        seen.append(len(c.messages or []))
        return counter(c)

    backend.count_tokens = count_tokens  # type: ignore[method-assign]
    c = ctx(messages=msgs, max_tokens=16)
    await t.apply(c)
    limit = 256 - 16
    cands = _reference(msgs, strategy == "middle_out")
    sizes = [sum(len(msgs[i]["content"].split()) + 2 for i in keep) for keep in cands]
    best = next(k for k, size in enumerate(sizes) if size <= limit)
    assert c.messages == [msgs[i] for i in cands[best]]
    assert c.prompt_tokens == sizes[best] and c.trimmed_tokens == sizes[0] - sizes[best]
    assert backend.counted <= 2 + 2 * 12  # the full count, then about 2 log2(2,000) probes
    # what is rendered and tokenized: the full count once, then probes near the kept size
    # (a bisection over the whole range renders about len(msgs) more: n/2 + n/4 + ...)
    assert seen[0] == len(msgs) and sum(seen[1:]) <= len(msgs) // 4
