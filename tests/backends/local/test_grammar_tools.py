"""Tool-call grammars against each tool's own schema: `$defs`, `definitions`, `#` recursion
and nested refs resolve inside the tool's parameters (a property test over generated
schemas: every call a random walk through the grammar writes validates against its tool's
schema), and jump-forward decoding (forced wrapper tokens are appended, not sampled)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import xgrammar as xgr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from backends.local.grammar import (
    CALL_TAIL,
    TAG,
    Constraint,
    GrammarLimits,
    Grammars,
    Wrapper,
    call_head,
    tools_grammar,
)
from backends.local.toolcalls import ToolCallParser

EOS = [3]  # the demo model's end of turn
CLOSING = set('"}],:0123456789')  # what ends values soon (opening ones recurse)


@pytest.fixture(scope="module")
def grammars(demo_model: Path) -> Grammars:
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    return Grammars(tok, 2048, EOS, GrammarLimits())


def compile_tools(
    g: Grammars, tools: list[dict[str, Any]], required: bool = True
) -> xgr.CompiledGrammar:
    text = tools_grammar(tools, required, False, False)
    return g.compiler.compile_structural_tag(text[len(TAG) :])


def tool(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def walk(g: Grammars, compiled: xgr.CompiledGrammar, rng: random.Random, limit: int = 1500) -> str:
    """A random output of the grammar, as the engine's constraint allows it (valid UTF-8, no
    control characters): forced text taken as it is, each other token drawn among the
    allowed ones with a bias toward closing punctuation (so values and recursion end)."""
    c = Constraint(xgr.GrammarMatcher(compiled), g.vocab, EOS, g.utf8, g.controls)
    out = b""
    for _ in range(limit):
        if c.matcher.is_terminated():
            return out.decode()
        forced = c.matcher.find_jump_forward_string()
        if forced:
            assert c.matcher.accept_string(forced)
            out += forced.encode()
            continue
        mask = c.allowed().numpy()
        allowed = [int(t) for t in np.flatnonzero(mask) if t not in EOS]
        if mask[EOS[0]] and (rng.random() < 0.9 or not allowed):
            assert c.accept(EOS[0])
            continue
        pieces = [g.pieces[t].decode("latin-1") for t in allowed]
        weights = [
            (
                0.001
                if "{" in p or "[" in p
                else 0.01
                if p.isspace()
                else 50.0
                if p == "null" or (p and set(p) <= CLOSING)
                else 1.0
            )
            / len(p or "xx") ** 2
            for p in pieces
        ]
        t = rng.choices(allowed, weights)[0]
        assert c.accept(t)
        out += g.pieces[t]
    raise AssertionError(f"the walk did not end in {limit} steps: {out[:200]!r}")


def calls_of(text: str) -> list[tuple[str, Any]]:
    parser = ToolCallParser()
    content, deltas = parser.feed(text)
    more_text, more = parser.flush()
    assert content + more_text == ""
    calls: dict[int, list[str]] = {}
    for d in deltas + more:
        name, args = calls.setdefault(d["index"], ["", ""])
        calls[d["index"]] = [
            name + (d["function"].get("name") or ""),
            args + d["function"]["arguments"],
        ]
    return [(n, json.loads(a)) for n, a in calls.values()]


# ---- generated schemas -----------------------------------------------------------------

leaf = st.sampled_from(
    [
        {"type": "integer", "minimum": 0, "maximum": 99},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "string", "maxLength": 4},
        {"type": "null"},
    ]
)


@st.composite
def tool_schema(draw: st.DrawFn) -> dict[str, Any]:
    """An object schema with definitions (under `$defs` or `definitions`), refs between
    them (a later one names an earlier one: nested refs), and maybe `#` recursion, bounded
    by an anyOf with null or an array of at most 2."""
    box = draw(st.sampled_from(["$defs", "definitions"]))
    defs: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 3))):
        props: dict[str, Any] = {}
        for j in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["leaf", "ref", "root", "list"]))
            if kind == "ref" and defs:
                props[f"p{j}"] = {"$ref": f"#/{box}/{draw(st.sampled_from(sorted(defs)))}"}
            elif kind == "root":
                props[f"p{j}"] = {"anyOf": [{"$ref": "#"}, {"type": "null"}]}
            elif kind == "list":
                props[f"p{j}"] = {
                    "type": "array",
                    "maxItems": 2,
                    "items": {"$ref": f"#/{box}/D{i - 1}"} if i else draw(leaf),
                }
            else:
                props[f"p{j}"] = draw(leaf)
        defs[f"D{i}"] = {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    top = {name: {"$ref": f"#/{box}/{name}"} for name in defs}
    top["n"] = draw(leaf)
    return {
        box: defs,
        "type": "object",
        "properties": top,
        "required": sorted(top),
        "additionalProperties": False,
    }


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(a=tool_schema(), b=tool_schema(), seed=st.integers(0, 2**16))
def test_every_generated_call_validates_against_its_own_tools_schema(
    grammars: Grammars, a: dict[str, Any], b: dict[str, Any], seed: int
) -> None:
    tools = [tool("alpha", a), tool("beta", b)]
    compiled = compile_tools(grammars, tools)
    rng = random.Random(seed)
    for _ in range(3):
        ((name, args),) = calls_of(walk(grammars, compiled, rng))
        jsonschema.validate(args, a if name == "alpha" else b)


def test_recursion_and_nested_refs_resolve_in_the_tool_not_the_wrapper(grammars: Grammars) -> None:
    node = {
        "type": "object",
        "additionalProperties": False,
        "required": ["v", "kids"],
        "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#"}},
        },
    }
    nested = {
        "definitions": {
            "P": {
                "type": "object",
                "required": ["x"],
                "properties": {"x": {"$ref": "#/definitions/Q"}},
            },
            "Q": {"type": "integer"},
        },
        "type": "object",
        "required": ["p"],
        "properties": {"p": {"$ref": "#/definitions/P"}},
    }
    compiled = compile_tools(grammars, [tool("tree", node), tool("nest", nested)])
    ok = [
        call_head("tree") + '{"v":1,"kids":[{"v":2,"kids":[]}]}' + CALL_TAIL,
        call_head("nest") + '{"p":{"x":3}}' + CALL_TAIL,
    ]
    wrong = [
        call_head("tree") + '{"v":1,"kids":[{"name":"tree","arguments":{}}]}' + CALL_TAIL,
        call_head("nest") + '{"p":{"x":"3"}}' + CALL_TAIL,
    ]
    for text in ok:
        assert xgr.GrammarMatcher(compiled).accept_string(text), text
    for text in wrong:  # the wrapper's shape is no child of the tool's own schema
        assert not xgr.GrammarMatcher(compiled).accept_string(text), text


def test_the_wrapper_is_told_apart_from_the_arguments() -> None:
    w = Wrapper()
    assert w.split("hello") == [("hello", False)]
    head = call_head("f")
    assert w.split(head + '{"a":') == [(head, True), ('{"a":', False)]
    w.feed("<tool_call>")
    assert w.split('{"name":"f","arguments":{') == [
        ('{"name":"f","arguments":', True),
        ("{", False),
    ]
    w.feed('{"name":"f","arguments":{"a":1')
    assert w.in_args
    assert w.split("}}</tool_call>") == [("}", False), ("}</tool_call>", True)]
    w.feed("}")
    assert w.split("}</tool_call>") == [("}</tool_call>", True)]
    w.feed("}</tool_call>")
    assert not w.in_args and w.split("x") == [("x", False)]


def test_wrapper_tokens_count_the_longest_head_and_the_tail(grammars: Grammars) -> None:
    short, long = tool("f", {}), tool("a_much_longer_function_name", {})
    tail = len(grammars.encode(CALL_TAIL))
    assert grammars.wrapper_tokens([short]) == len(grammars.encode(call_head("f"))) + tail
    both = grammars.wrapper_tokens([short, long])
    assert both == len(grammars.encode(call_head("a_much_longer_function_name"))) + tail
    assert both > grammars.wrapper_tokens([short]) > tail
