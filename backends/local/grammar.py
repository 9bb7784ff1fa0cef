"""Grammar-constrained decoding with llguidance: JSON (any object, or one schema) and tool
calls, per sequence, so one batch mixes constrained and free sequences.

Why llguidance (README "Structured outputs"): at batch 8 on the demo model its per-token
mask cost was measured against xgrammar's with bench/grammar.py, and it installs as one
wheel with no dependencies (xgrammar brings transformers and triton).

Grammars are bounded: a schema larger than `max_schema_bytes`, or one that does not compile
within `compile_timeout_s` (or past llguidance's own size and fuel limits), is a 400; the
compiled matchers are cached by grammar text (LRU of `cache_size`), so a repeated schema is
compiled once and a hostile one cannot make every request pay for it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import numpy as np
import torch

from gateway.core.errors import InvalidRequest

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Compact JSON, properties in the schema's order: what the tool-call parser reads back.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}  # llguidance's stub names no type


@dataclass(frozen=True)
class GrammarLimits:
    max_schema_bytes: int = 64 * 1024
    compile_timeout_s: float = 2.0
    cache_size: int = 64

    def __post_init__(self) -> None:
        if self.max_schema_bytes < 1 or self.compile_timeout_s <= 0 or self.cache_size < 1:
            raise ValueError("grammar limits must be positive")


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Any JSON object (json_object), or one that validates against `schema` (json_schema)."""
    return llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                 defaults=_JSON_OPTIONS)


def tool_call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call of one of `tools`: {"name": <its name>, "arguments": <its parameters>}."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        variants.append({"type": "object", "additionalProperties": False,
                         "properties": {"name": {"const": fn["name"]}, "arguments": params},
                         "required": ["name", "arguments"]})
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tools_grammar(tools: Sequence[dict[str, Any]], required: bool, parallel: bool,
                  text_schema: dict[str, Any] | bool | None) -> str:
    """Calls of `tools` as <tool_call>{...}</tool_call> (one, or one or more with `parallel`);
    unless `required`, free text instead (or JSON when `text_schema` is a schema / True for
    any object)."""
    call_schema = {**tool_call_schema(tools), "x-guidance": _JSON_OPTIONS}
    call = f'"{TOOL_CALL_OPEN}" %json {json.dumps(call_schema)} "{TOOL_CALL_CLOSE}"'
    calls = "call+" if parallel else "call"
    if required:
        start = calls
    elif text_schema is False:
        start = f"TEXT | {calls}"
    else:
        schema = text_schema if isinstance(text_schema, dict) else {"type": "object"}
        start = f"%json {json.dumps({**schema, 'x-guidance': _JSON_OPTIONS})} | {calls}"
    return (f"start: {start}\ncall: {call}\n"
            # free text: anything that does not open a tool call
            "TEXT: /[^<](.|\\n)*/\n")


class Constraint:
    """One sequence's grammar state: the mask of the tokens it allows next, then the token
    taken. After the grammar ends only the end of sequence is allowed."""

    def __init__(self, matcher: llg.LLMatcher, model_vocab: int, eos_ids: Sequence[int]) -> None:
        self.matcher = matcher
        self.vocab = model_vocab
        self.eos_ids = list(eos_ids)

    def allowed(self) -> torch.Tensor:
        """Bool [model vocab]: True where the token keeps the output in the grammar."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little")
        mask = np.zeros(self.vocab, dtype=np.bool_)
        n = min(self.vocab, bits.size)
        mask[:n] = bits[:n]
        if not mask.any():  # an error state: end the sequence rather than sample from nothing
            mask[self.eos_ids] = True
        return torch.from_numpy(mask)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)  # an error state ends in EOS-only masks

    @property
    def failed(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class Grammars:
    """Compiles and caches grammars for one tokenizer."""

    def __init__(self, tokenizer_json: str, model_vocab: int, eos_ids: Sequence[int],
                 limits: GrammarLimits) -> None:
        self.eos_ids = sorted(eos_ids)
        self.tokenizer = llg.LLTokenizer(tokenizer_json, eos_token=self.eos_ids)
        self.vocab = model_vocab
        self.limits = limits
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and telemetry

    def check_size(self, param: str, value: Any) -> None:
        size = len(json.dumps(value))
        if size > self.limits.max_schema_bytes:
            raise InvalidRequest(
                f"'{param}' is {size} bytes as JSON; this model constrains output with schemas "
                f"of at most {self.limits.max_schema_bytes} bytes.", param=param,
                code="schema_too_large")

    async def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh Constraint for `grammar` (compiled once, then copied from the cache)."""
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            template = await self._compile(grammar, param)
        with self._lock:
            return Constraint(template.deep_copy(), self.vocab, self.eos_ids)

    async def _compile(self, grammar: str, param: str) -> llg.LLMatcher:
        task = asyncio.to_thread(llg.LLMatcher, self.tokenizer, grammar, log_level=0)
        try:
            matcher = await asyncio.wait_for(task, self.limits.compile_timeout_s)
        except TimeoutError:
            raise InvalidRequest(
                f"'{param}' did not compile to a grammar within "
                f"{self.limits.compile_timeout_s:g} s; simplify the schema.", param=param,
                code="schema_too_complex") from None
        if matcher.is_error():
            raise InvalidRequest(f"'{param}' cannot be enforced: {matcher.get_error()[:300]}",
                                 param=param, code="invalid_schema")
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = matcher
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return matcher
