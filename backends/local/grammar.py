"""Grammar-constrained decoding with xgrammar: JSON (any object, or one schema) and tool
calls, per sequence, so one batch mixes constrained and free sequences.

Why xgrammar (README "Structured outputs"): on the demo model at batch 8 its next-token mask
cost 6 µs against llguidance's 36 µs per token (bench/grammar.py, side by side), because it
precomputes most of each grammar's token masks when it compiles it. What that costs: a
heavier install (xgrammar brings transformers and triton), and a compile that does more work,
which the limits below bound.

Grammars are bounded: a schema larger than `max_schema_bytes`, or one that does not compile
within `compile_timeout_s`, is a 400; compiled grammars are cached by grammar text (LRU of
`cache_size`), so a repeated schema is compiled once and a hostile one cannot make every
request pay for it.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from backends.local.utf8 import Utf8Table
from gateway.core.errors import InvalidRequest

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class GrammarLimits:
    max_schema_bytes: int = 64 * 1024
    compile_timeout_s: float = 2.0
    cache_size: int = 64

    def __post_init__(self) -> None:
        if self.max_schema_bytes < 1 or self.compile_timeout_s <= 0 or self.cache_size < 1:
            raise ValueError("grammar limits must be positive")


# A grammar's text (the cache key) says how it compiles: "json:" + a JSON schema (compact
# output), or "tag:" + an xgrammar structural tag (tool calls).
JSON, TAG = "json:", "tag:"
_WHERE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix


def _schema(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """A JSON-schema content of a structural tag: properties in schema order (what the
    tool-call parser reads back), at most one whitespace character between elements."""
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Any JSON object (json_object), or one that validates against `schema` (json_schema)."""
    return JSON + json.dumps(schema if schema is not None else {"type": "object"})


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
    call = {"type": "tag", "begin": TOOL_CALL_OPEN, "content": _schema(tool_call_schema(tools)),
            "end": TOOL_CALL_CLOSE}
    calls: dict[str, Any] = {"type": "plus", "content": call} if parallel else call
    fmt: dict[str, Any]
    if required:
        fmt = calls
    elif text_schema is False:  # free text, or calls once the text opens one
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": [call],
               "at_least_one": False, "stop_after_first": not parallel}
    else:
        schema = text_schema if isinstance(text_schema, dict) else {"type": "object"}
        fmt = {"type": "or", "elements": [_schema(schema), calls]}
    return TAG + json.dumps({"type": "structural_tag", "format": fmt})


def _free_text(grammar: str) -> bool:
    """The grammar lets free text through (tool calls with tool_choice auto), where newlines
    and tabs stay allowed."""
    return '"triggered_tags"' in grammar


class Constraint:
    """One sequence's grammar state: the mask of the tokens it allows next, then the token
    taken. After the grammar ends only the end of sequence is allowed."""

    def __init__(self, matcher: xgr.GrammarMatcher, model_vocab: int, eos_ids: Sequence[int],
                 utf8: Utf8Table, banned: np.ndarray | None = None) -> None:
        self.matcher = matcher
        self.vocab = model_vocab
        self.eos_ids = list(eos_ids)
        self.utf8 = utf8
        self.state = 0  # where the output stands in its last character (backends/local/utf8.py)
        self.banned = banned  # tokens never taken (bool [model vocab])
        self._bits = xgr.allocate_token_bitmask(1, model_vocab)  # filled in place

    def allowed(self) -> torch.Tensor:
        """Bool [model vocab]: True where the token keeps the output in the grammar."""
        self.matcher.fill_next_token_bitmask(self._bits)
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        mask = bits[: self.vocab].astype(np.bool_) & self.utf8.valid[self.state]
        if self.banned is not None:
            mask &= ~self.banned
        if not mask.any():  # nothing left to allow: end the sequence rather than sample nothing
            mask[self.eos_ids] = True
        return torch.from_numpy(mask)

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)  # a refused token (never sampled from the mask) is a no-op
        if 0 <= token < self.vocab:
            self.state = int(self.utf8.after[self.state, token])


class Grammars:
    """Compiles and caches grammars for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer, model_vocab: int, eos_ids: Sequence[int],
                 limits: GrammarLimits) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        encoded = [""] * max(len(vocab), max(vocab.values(), default=-1) + 1)
        for token, i in vocab.items():
            encoded[i] = token
        # how the tokenizer encodes bytes (byte-level, byte fallback, raw), as xgrammar's own
        # from_huggingface reads it from the same tokenizer.json
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
        self.info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=model_vocab,
                                      stop_token_ids=sorted(eos_ids),
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.eos_ids = sorted(eos_ids)
        # Tokens with a control character (U+0000-U+001F): xgrammar's JSON strings accept them
        # raw, which JSON forbids (parsers refuse "Invalid control character"). JSON never
        # needs one (escapes exist, and whitespace between elements is optional), so JSON
        # grammars never take them.
        controls = np.zeros(model_vocab, dtype=np.bool_)
        for i, piece in enumerate(self.info.decoded_vocab[:model_vocab]):
            controls[i] = any(byte < 0x20 for byte in piece)
        controls[self.eos_ids] = False
        self.controls = controls
        self.utf8 = Utf8Table(self.info.decoded_vocab, model_vocab, self.eos_ids)
        self.vocab = model_vocab
        self.limits = limits
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[str, asyncio.Future[xgr.CompiledGrammar]] = {}
        self.compiled = 0  # grammars compiled (cache misses), for tests and telemetry

    def check_size(self, param: str, value: Any) -> None:
        size = len(json.dumps(value))
        if size > self.limits.max_schema_bytes:
            raise InvalidRequest(
                f"'{param}' is {size} bytes as JSON; this model constrains output with schemas "
                f"of at most {self.limits.max_schema_bytes} bytes.", param=param,
                code="schema_too_large")

    async def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh Constraint for `grammar` (compiled once, then taken from the cache)."""
        with self._lock:
            compiled = self._cache.get(grammar)
            if compiled is not None:
                self._cache.move_to_end(grammar)
        if compiled is None:
            # one compile per grammar, however many requests wait for it
            pending = self._pending.get(grammar)
            if pending is None:
                pending = asyncio.ensure_future(self._compile(grammar, param))
                self._pending[grammar] = pending
                pending.add_done_callback(lambda _: self._pending.pop(grammar, None))
            compiled = await asyncio.shield(pending)
        banned = self.controls if grammar.startswith(JSON) or not _free_text(grammar) else None
        return Constraint(xgr.GrammarMatcher(compiled), self.vocab, self.eos_ids, self.utf8,
                          banned)

    async def _compile(self, grammar: str, param: str) -> xgr.CompiledGrammar:
        compile_one: Callable[[], xgr.CompiledGrammar]
        if grammar.startswith(JSON):
            def compile_one() -> xgr.CompiledGrammar:
                return self.compiler.compile_json_schema(grammar[len(JSON):], any_whitespace=False)
        else:
            def compile_one() -> xgr.CompiledGrammar:
                return self.compiler.compile_structural_tag(grammar[len(TAG):])
        task = asyncio.to_thread(compile_one)
        try:
            compiled = await asyncio.wait_for(task, self.limits.compile_timeout_s)
        except TimeoutError:
            raise InvalidRequest(
                f"'{param}' did not compile to a grammar within "
                f"{self.limits.compile_timeout_s:g} s; simplify the schema.", param=param,
                code="schema_too_complex") from None
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors for a schema it refuses
            why = _WHERE.sub("", str(exc)).strip()[:300]
            raise InvalidRequest(f"'{param}' cannot be enforced: {why}", param=param,
                                 code="invalid_schema") from None
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = compiled
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return compiled
