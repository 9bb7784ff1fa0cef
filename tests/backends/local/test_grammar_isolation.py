"""Grammar compiles apart from the gateway and from each other tenant: the compiled-grammar
cache per tenant (or `shared`), bounded in bytes; a compile past its deadline, or one nobody
waits for any more, killed with its worker process; xgrammar's refusals answered with our own
message (backends/local/grammar.py, backends/local/compile_worker.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from backends.local.backend import LocalConfig
from backends.local.grammar import (
    SHARED,
    TAG,
    GrammarLimits,
    Grammars,
    json_grammar,
    refusal_message,
    refusal_reason,
)
from gateway.core.errors import InvalidRequest


def patterns(seed: int, n: int, base: int) -> dict[str, Any]:
    """n strings, each a pattern of up to base + i letters: xgrammar's compile grows fast."""
    props = {f"f{seed}_{i}": {"type": "string", "pattern": f"({'|'.join('abcdefgh')}){{1,{base + i}}}x"}
             for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props)}


# About 11 CPU-seconds of xgrammar on the demo tokenizer (2,000 tokens), 24 KB as JSON: the
# kind of schema a hostile tenant sends.
SLOW = patterns(0, 300, 40)
# About 1 CPU-second: compiles within the default 2 s.
MEDIUM = patterns(1, 120, 20)


def small(i: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"field{i}": {"type": "string", "maxLength": 8},
                                             "n": {"type": "integer"}},
            "required": [f"field{i}"]}


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model / "tokenizer.json"))


@pytest.fixture
def make(tokenizer: Tokenizer) -> Iterator[Callable[..., Grammars]]:
    made: list[Grammars] = []

    def build(**limits: Any) -> Grammars:
        g = Grammars(tokenizer, 2048, [3], GrammarLimits(**limits))
        made.append(g)
        return g

    yield build
    for g in made:
        g.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def settle(check: Callable[[], bool], tries: int = 200) -> bool:
    """check() once it holds, polled (a killed process is reaped by the forkserver)."""
    for _ in range(tries):
        if check():
            return True
        time.sleep(0.05)
    return check()


async def busy_worker(g: Grammars) -> int:
    for _ in range(400):
        pids = g.workers.busy_pids()
        if pids:
            return pids[0]
        await asyncio.sleep(0.025)
    raise AssertionError("no worker took the compile")


# ---- the cache: per tenant unless shared, bounded in bytes ------------------------------


def test_isolated_cache_compiles_once_per_tenant(make: Callable[..., Grammars]) -> None:
    g = make()
    schema = json_grammar(small(1))

    async def run() -> None:
        await g.constraint(schema, "response_format", "acme")
        await g.constraint(schema, "response_format", "acme")  # acme's cache
        await g.constraint(schema, "response_format", "globex")  # not acme's: compiled again

    asyncio.run(run())
    assert g.compiles == {"acme": 1, "globex": 1} and g.compiled == 2
    sizes = g.cache_sizes()
    assert set(sizes) == {"acme", "globex"} and sizes["acme"] == sizes["globex"] > 0
    assert g.cached(schema, "acme") is not g.cached(schema, "globex")
    assert g.cached(schema, "initech") is None


def test_shared_cache_serves_every_tenant(make: Callable[..., Grammars]) -> None:
    g = make(cache="shared")
    schema = json_grammar(small(1))

    async def run() -> None:
        await g.constraint(schema, "response_format", "acme")
        await g.constraint(schema, "response_format", "globex")

    asyncio.run(run())
    assert g.compiles == {SHARED: 1} and g.compiled == 1
    assert set(g.cache_sizes()) == {SHARED}
    assert g.cached(schema, "globex") is g.cached(schema, "acme") is not None


@pytest.mark.parametrize(("mode", "compiles"), [("isolated", {"acme": 1, "globex": 1}),
                                                 ("shared", {SHARED: 1})])
def test_concurrent_requests_share_a_compile_only_within_the_scope(
        make: Callable[..., Grammars], mode: str, compiles: dict[str, int]) -> None:
    g = make(cache=mode)
    schema = json_grammar(small(2))

    async def run() -> None:
        await asyncio.gather(*(g.constraint(schema, "response_format", tenant)
                               for tenant in ["acme", "globex", "acme", "globex", "acme"]))

    asyncio.run(run())
    assert g.compiles == compiles


def test_the_cache_is_bounded_in_bytes_lru(make: Callable[..., Grammars]) -> None:
    probe = make(cache="shared")
    grammars = [json_grammar(small(i)) for i in range(4)]

    async def sizes() -> list[int]:
        out = []
        for gram in grammars:
            await probe.constraint(gram, "response_format", "acme")
            compiled = probe.cached(gram)
            assert compiled is not None
            out.append(int(compiled.memory_size_bytes))
        return out

    size = asyncio.run(sizes())
    assert sum(probe.cache_sizes().values()) == sum(size)  # an entry's bytes: xgrammar's size
    # room for the last two of the first three, not for all three
    g = make(cache_bytes=size[1] + size[2] + min(size[:3]) - 1)

    async def run() -> None:
        for gram in grammars[:3]:
            await g.constraint(gram, "response_format", "acme")

    asyncio.run(run())
    assert sum(g.cache_sizes().values()) <= g.limits.cache_bytes
    assert g.cached(grammars[0], "acme") is None  # the least recently used went
    assert g.cached(grammars[1], "acme") is not None and g.cached(grammars[2], "acme") is not None
    asyncio.run(g.constraint(grammars[0], "response_format", "acme"))
    assert g.compiles == {"acme": 4}  # evicted: compiled again

    tiny = make(cache_bytes=0)  # nothing fits: used, never kept
    asyncio.run(tiny.constraint(grammars[3], "response_format", "acme"))
    asyncio.run(tiny.constraint(grammars[3], "response_format", "acme"))
    assert tiny.compiles == {"acme": 2} and tiny.cache_sizes() == {}


def test_config_keys() -> None:
    cfg = LocalConfig(model="m", grammar_cache="shared", grammar_cache_bytes=1 << 20)
    assert cfg.grammar_limits().cache == "shared" and cfg.grammar_limits().cache_bytes == 1 << 20
    assert LocalConfig(model="m").grammar_limits().cache == "isolated"
    assert LocalConfig(model="m").grammar_cache_bytes == 64 * 2**20
    with pytest.raises(ValueError, match="grammar_cache"):
        LocalConfig(model="m", grammar_cache="per-user")
    with pytest.raises(TypeError):
        LocalConfig(model="m", grammar_cache_size=64)  # type: ignore[call-arg]


# ---- a compile stops for real ----------------------------------------------------------


def test_a_compile_past_its_deadline_kills_its_worker(make: Callable[..., Grammars]) -> None:
    g = make(compile_timeout_s=0.3)

    async def run() -> int:
        task = asyncio.ensure_future(g.constraint(json_grammar(SLOW), "response_format", "evil"))
        pid = await busy_worker(g)
        with pytest.raises(InvalidRequest) as info:
            await task
        assert info.value.code == "schema_too_complex" and info.value.param == "response_format"
        return pid

    pid = asyncio.run(run())
    assert settle(lambda: not alive(pid))  # killed: no CPU or memory left behind
    assert pid not in g.workers.pids() and g.workers.killed >= 1 and g.compiled == 0
    started = g.workers.started
    asyncio.run(g.constraint(json_grammar(small(1)), "response_format", "acme"))  # a fresh one
    assert g.workers.started == started + 1 and g.compiles == {"acme": 1}


def test_a_compile_nobody_waits_for_is_killed(make: Callable[..., Grammars]) -> None:
    g = make(compile_timeout_s=60)
    gram = json_grammar(SLOW)

    async def run() -> int:
        first = asyncio.ensure_future(g.constraint(gram, "response_format", "acme"))
        second = asyncio.ensure_future(g.constraint(gram, "response_format", "acme"))
        pid = await busy_worker(g)
        first.cancel()  # one client went away: the other still waits, the compile goes on
        await asyncio.sleep(0.2)
        assert alive(pid) and g.workers.busy_pids() == [pid]
        second.cancel()  # nobody waits any more: the compile stops
        for t in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await t
        return pid

    pid = asyncio.run(run())
    assert settle(lambda: not alive(pid))
    assert g.workers.busy_pids() == [] and g.compiled == 0 and g.cache_sizes() == {}


def test_a_compile_that_passed_in_its_worker_is_finished_and_kept(
        make: Callable[..., Grammars]) -> None:
    g = make(compile_timeout_s=30)
    gram = json_grammar(MEDIUM)

    async def run() -> None:
        waiter = asyncio.ensure_future(g.constraint(gram, "response_format", "acme"))
        flight = None
        for _ in range(2000):  # until the worker's compile passed (the compile here began)
            flight = g._pending.get(("acme", gram))
            if flight is not None and flight.committed:
                break
            await asyncio.sleep(0.01)
        assert flight is not None and flight.committed
        waiter.cancel()  # the client went away: the bounded compile here is finished, kept
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(asyncio.shield(flight.task), 60)

    asyncio.run(run())
    assert g.compiles == {"acme": 1} and g.cached(gram, "acme") is not None
    assert g.workers.killed == 0


def test_workers_are_reused_and_their_memory_is_reported(make: Callable[..., Grammars]) -> None:
    g = make()
    g.start()

    async def run() -> None:
        for i in range(5):
            await g.constraint(json_grammar(small(i)), "response_format", "acme")

    asyncio.run(run())
    assert g.workers.started == 1 and g.compiled == 5  # one warm worker did every compile
    assert len(g.workers.pids()) == 1 and g.workers.memory_bytes() > 0
    pid = g.workers.pids()[0]
    g.close()
    assert settle(lambda: not alive(pid)) and g.workers.pids() == []


# ---- refusals: our message, xgrammar's in the log ----------------------------------------

XGRAMMAR_CHECK = ("[21:39:30] /project/cpp/grammar_compiler.cc:1318: Check failed: "
                  "(std::holds_alternative<Grammar>(result)) is false: Invalid structural tag "
                  "error: Format type not recognized: bogus\n")


def test_refusal_reasons_carry_no_source_text() -> None:
    assert refusal_reason(XGRAMMAR_CHECK) == ("Invalid structural tag error: Format type not "
                                              "recognized: bogus")
    assert refusal_reason("[21:39:30] /project/cpp/json_schema_converter.cc:5088: Cannot find "
                          "field 'nowhere' in #/nowhere\n") == "Cannot find field 'nowhere' in #/nowhere"
    assert refusal_reason("Check failed: x == y\n  at /src/a.cc:12") == ""
    assert refusal_reason("bad thing in src/foo.cc:12: more") == "bad thing in more"
    long = refusal_reason("[1:2:3] a.cc:1: " + "word " * 200)
    assert len(long) <= 160 and long.endswith("...")
    message = refusal_message("tools", XGRAMMAR_CHECK)
    assert message.startswith("'tools' cannot be enforced") and "Check failed" not in message


@pytest.mark.parametrize(("grammar", "param"), [
    (json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
     "response_format"),
    (json_grammar({"type": "string", "pattern": "(?<=a)b"}), "response_format"),
    (TAG + '{"type": "structural_tag", "format": {"type": "bogus"}}', "tools"),
])
def test_a_refused_grammar_is_a_400_with_our_message(
        make: Callable[..., Grammars], caplog: pytest.LogCaptureFixture, grammar: str,
        param: str) -> None:
    g = make()
    with caplog.at_level(logging.WARNING, logger="backends.local.grammar"), \
            pytest.raises(InvalidRequest) as info:
        asyncio.run(g.constraint(grammar, param, "acme", "req-42"))
    err = info.value
    assert err.code == "invalid_schema" and err.param == param and err.status == 400
    assert err.message.startswith(f"'{param}' cannot be enforced")
    for leak in ("Check failed", ".cc", "/project", "cpp/", "holds_alternative"):
        assert leak not in err.message
    logged = [r.getMessage() for r in caplog.records if "req-42" in r.getMessage()]
    assert len(logged) == 1 and ".cc:" in logged[0]  # the full text, with the request id
    assert g.workers.killed == 0  # a refusal is an answer: the worker is kept
