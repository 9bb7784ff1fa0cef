"""context_trim: exact counts, system prompt and last user message kept, strategies."""

from __future__ import annotations

import pytest

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
