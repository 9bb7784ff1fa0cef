"""Grammar-constrained decoding with xgrammar: JSON (any object, or one schema) and tool
calls, per sequence, so one batch mixes constrained and free sequences.

Why xgrammar (docs/engine.md "Structured outputs"): on the demo model at batch 8 its next-token mask
cost 6 µs against llguidance's 36 µs per token (bench/grammar.py, side by side), because it
precomputes most of each grammar's token masks when it compiles it. What that costs: a
heavier install (xgrammar brings transformers and triton), and a compile that does more work,
which the limits below bound.

Grammars are bounded: a schema larger than `max_schema_bytes` is a 400 before anything
compiles. A new grammar compiles first in a worker process (backends/local/compile_worker.py)
while it holds a slot of the tenant-fair CPU pool (gateway/core/cpu.py); one that passes
`compile_timeout_s` (CPU seconds of its worker, from the moment it starts) is killed there and
answered 400 `schema_too_complex`; one xgrammar refuses is a 400 `invalid_schema` with our own
message (xgrammar's text, C++ file names and all, goes to the log with the request id). Only a
grammar that compiled in time is compiled again here, on a thread of the pool: the same work,
so it ends as the worker's did (why twice: compile_worker.py's docstring).

Compiled grammars are cached, per tenant (`cache: isolated`, a cache hit is a timing signal:
another tenant would learn which schemas one sends) or across tenants (`shared`), in an LRU
bounded in bytes (`cache_bytes`, each entry at xgrammar's memory_size_bytes), so a repeated
schema is compiled once and a hostile one cannot make every request pay for it. Concurrent
requests for one grammar (of one tenant, under `isolated`) wait for one compile; when all of
them go away while the worker compiles, it is killed (the compile here, bounded, is finished
and kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xgrammar as xgr
from tokenizers import Tokenizer

from backends.local.compile_worker import (
    JSON_SCHEMA,
    STRUCTURAL_TAG,
    CompileFailed,
    CompileRefused,
    CompileTimeout,
    CompileWorkers,
)
from backends.local.utf8 import Utf8Table
from gateway.core import cpu
from gateway.core.errors import BackendError, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


CACHE_MODES = ("isolated", "shared")


@dataclass(frozen=True)
class GrammarLimits:
    max_schema_bytes: int = 64 * 1024
    compile_timeout_s: float = 2.0  # CPU seconds of the compile's worker
    cache_bytes: int = 64 * 2**20  # compiled grammars kept (LRU), by xgrammar's memory size
    cache: str = "isolated"  # isolated (per tenant) | shared (across tenants)

    def __post_init__(self) -> None:
        if self.max_schema_bytes < 1 or self.compile_timeout_s <= 0 or self.cache_bytes < 0:
            raise ValueError("grammar limits must be positive (grammar_cache_bytes >= 0)")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"grammar_cache={self.cache!r}; expected one of "
                             f"{', '.join(CACHE_MODES)}")

    @property
    def queue_timeout_s(self) -> float:
        """How long a compile may wait for a slot of the CPU pool (others' compiles hold
        them at most their own deadline each): a 503 past it."""
        return max(30.0, 15 * self.compile_timeout_s)


# A grammar's text (the cache key) says how it compiles: "json:" + a JSON schema (compact
# output), or "tag:" + an xgrammar structural tag (tool calls).
JSON, TAG = "json:", "tag:"
SHARED = "(shared)"  # the cache scope of every tenant under `cache: shared`, as memory() names it

# What of xgrammar's message may reach a client: its "[time] /path/file.cc:line: " prefix
# and "Check failed: (...) is false:" assertion text go, and so does any file name left.
_WHERE = re.compile(r"\[[\d:]+\]\s*\S+:\d+:\s*")
_CHECK = re.compile(r"Check failed:.*?is false:?\s*", re.DOTALL)
_FILE = re.compile(r"\S*\.(?:cc|cpp|cxx|h|hpp|hxx|py|so)\b(?::\d+)?:?", re.IGNORECASE)
REASON_CHARS = 160


def refusal_reason(detail: str) -> str:
    """A short reason from xgrammar's message for a refused grammar: its first line without
    source locations, file names or assertion text, printable, at most REASON_CHARS; empty
    when nothing of it is safe to show."""
    line = next((ln for ln in detail.strip().splitlines() if ln.strip()), "")
    line = _WHERE.sub("", line)
    line = _CHECK.sub("", line)
    line = _FILE.sub("", line)
    line = "".join(ch for ch in line if ch.isprintable())
    line = " ".join(line.split())
    if "check failed" in line.lower():
        return ""
    if len(line) > REASON_CHARS:
        line = line[: REASON_CHARS - 3].rstrip() + "..."
    return line


def refusal_message(param: str, detail: str) -> str:
    """The 400 `invalid_schema` message: fixed, naming the param, with the short reason."""
    reason = refusal_reason(detail)
    message = f"'{param}' cannot be enforced as a grammar by this model"
    return f"{message}: {reason}" if reason else f"{message}."


def _schema(schema: dict[str, Any] | bool) -> dict[str, Any]:
    """A JSON-schema content of a structural tag: properties in schema order (what the
    tool-call parser reads back), at most one whitespace character between elements."""
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Any JSON object (json_object), or one that validates against `schema` (json_schema)."""
    return JSON + json.dumps(schema if schema is not None else {"type": "object"})


def call_head(name: str) -> str:
    """What opens a call of `name`, as the chat template writes it (compact)."""
    return TOOL_CALL_OPEN + '{"name":' + json.dumps(name) + ',"arguments":'


CALL_TAIL = "}" + TOOL_CALL_CLOSE  # closes the wrapper object, then the tag


def call_tags(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One structural tag per tool: its head and tail forced, its arguments compiled
    against its own `parameters` as the root schema, so `#`, `#/$defs/...` and
    `#/definitions/...` resolve inside the tool's schema (nested inside a wrapper schema
    they would resolve against the wrapper)."""
    tags = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        tags.append({"type": "tag", "begin": call_head(fn["name"]), "content": _schema(params),
                     "end": CALL_TAIL})
    return tags


def tools_grammar(tools: Sequence[dict[str, Any]], required: bool, parallel: bool,
                  text_schema: dict[str, Any] | bool | None) -> str:
    """Calls of `tools` as <tool_call>{"name":...,"arguments":...}</tool_call> (one, or one
    or more with `parallel`); unless `required`, free text instead (or JSON when
    `text_schema` is a schema / True for any object)."""
    tags = call_tags(tools)
    call: dict[str, Any] = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    calls: dict[str, Any] = {"type": "plus", "content": call} if parallel else call
    fmt: dict[str, Any]
    if required:
        fmt = calls
    elif text_schema is False:  # free text, or calls once the text opens one
        fmt = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags,
               "at_least_one": False, "stop_after_first": not parallel}
    else:
        schema = text_schema if isinstance(text_schema, dict) else {"type": "object"}
        fmt = {"type": "or", "elements": [_schema(schema), calls]}
    return TAG + json.dumps({"type": "structural_tag", "format": fmt})


def _free_text(grammar: str) -> bool:
    """The grammar lets free text through (tool calls with tool_choice auto), where newlines
    and tabs stay allowed."""
    return '"triggered_tags"' in grammar


_HEAD_DONE = re.compile(r'<tool_call>\{"name":"[A-Za-z0-9_-]{1,64}","arguments":')
_RECENT = 256  # characters of the output kept to find a call's head or end in


class Wrapper:
    """Where the output stands with respect to tool calls: inside a call's arguments or not,
    from the text taken so far (the last characters of it), so that forced text can be told
    apart: a call's wrapper, or content and arguments (what `max_tokens` bounds)."""

    def __init__(self) -> None:
        self.in_args = False
        self.recent = ""  # the last characters taken, since the last head or end

    def feed(self, piece: str) -> None:
        self.recent = (self.recent + piece)[-_RECENT:]
        while True:
            if not self.in_args:
                m = _HEAD_DONE.search(self.recent)
                if m is None:
                    return
                self.in_args, self.recent = True, self.recent[m.end():]
            else:
                at = self.recent.find(TOOL_CALL_CLOSE)
                if at < 0:
                    return
                self.in_args, self.recent = False, self.recent[at + len(TOOL_CALL_CLOSE):]

    def split(self, text: str) -> list[tuple[str, bool]]:
        """`text` (about to be taken) as spans, each True when it is a call's wrapper."""
        out: list[tuple[str, bool]] = []
        in_args, recent = self.in_args, self.recent
        while text:
            joined = recent + text
            if not in_args:
                m = next((m for m in _HEAD_DONE.finditer(joined) if m.end() > len(recent)),
                         None)
                if m is None:  # inside a head once its tag opened (after the last close)
                    opened = joined.rfind(TOOL_CALL_OPEN) > joined.rfind(TOOL_CALL_CLOSE)
                    out.append((text, opened))
                    break
                cut = m.end() - len(recent)
                out.append((text[:cut], True))
                in_args = True
            else:
                at = joined.find(TOOL_CALL_CLOSE, max(0, len(recent) - len(TOOL_CALL_CLOSE) + 1))
                if at < 0:
                    out.append((text, False))
                    break
                begin = at - 1 if at > 0 and joined[at - 1] == "}" else at
                end = at + len(TOOL_CALL_CLOSE)
                begin, cut = max(0, begin - len(recent)), end - len(recent)
                if begin:
                    out.append((text[:begin], False))
                out.append((text[begin:cut], True))
                in_args = False
            text, recent = text[cut:], ""
        return [(span, wrapper) for span, wrapper in out if span]


class Constraint:
    """One sequence's grammar state: the mask of the tokens it allows next, then the token
    taken. After the grammar ends only the end of sequence is allowed."""

    def __init__(self, matcher: xgr.GrammarMatcher, model_vocab: int, eos_ids: Sequence[int],
                 utf8: Utf8Table, banned: np.ndarray | None = None,
                 encode: Callable[[str], list[int]] | None = None,
                 pieces: Sequence[bytes] = (),
                 pretokens: Callable[[str], list[int]] | None = None) -> None:
        self.matcher = matcher
        self.vocab = model_vocab
        self.eos_ids = list(eos_ids)
        self.utf8 = utf8
        self.state = 0  # where the output stands in its last character (backends/local/utf8.py)
        self.banned = banned  # tokens never taken (bool [model vocab])
        self._bits = xgr.allocate_token_bitmask(1, model_vocab)  # filled in place
        self.encode = encode  # text -> token ids: forced text is appended as these (None: off)
        self.pieces = pieces  # token id -> its bytes (where calls' wrappers begin and end)
        self.pretokens = pretokens  # text -> where its words start (the tokenizer's split)
        self.wrapper = Wrapper()

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

    def accept(self, token: int) -> bool:
        """Take `token`; False (and nothing changes) when the grammar refuses it (never one
        sampled from the mask)."""
        if not self.matcher.accept_token(token):
            return False
        if 0 <= token < self.vocab:
            self.state = int(self.utf8.after[self.state, token])
            if token < len(self.pieces):
                self.wrapper.feed(self.pieces[token].decode("latin-1"))
        return True

    def forced(self) -> list[tuple[int, bool]]:
        """The tokens the grammar forces next (jump-forward: the text every continuation
        starts with), each with whether it belongs to a tool call's wrapper (tag, name,
        `"arguments":` and the closing) rather than to content or arguments; empty when the
        next token is the model's choice. Each span is tokenized on its own."""
        if self.encode is None or self.matcher.is_terminated():
            return []
        text = self.matcher.find_jump_forward_string()
        if text and self.pretokens is not None and not text.endswith(TOOL_CALL_CLOSE):
            # Its last word (the tokenizer's pre-token) is left to the model: what follows
            # may extend it (`":` then `{"` is one word, often one token), and a model
            # continues best from the tokens it was trained on. After a call's end only the
            # end of sequence or another call follows.
            starts = self.pretokens(text)
            text = text[: starts[-1]] if starts else text
        if not text:
            return []
        return [(t, wrapper) for span, wrapper in self.wrapper.split(text)
                for t in self.encode(span)]


@dataclass
class _Flight:
    """One compile in progress and how many requests wait for it."""

    waiters: int = 0
    committed: bool = False  # it compiled in time in a worker: finished here even if unwanted
    task: asyncio.Future[xgr.CompiledGrammar] = field(init=False)  # set once, on creation


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
        self.workers = CompileWorkers(self.info)
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
        self.tokenizer = tokenizer
        self.pieces: list[bytes] = list(self.info.decoded_vocab[:model_vocab])
        # (scope, grammar text) -> (compiled, its bytes); scope: the tenant, or "" when shared
        self._cache: OrderedDict[tuple[str, str], tuple[xgr.CompiledGrammar, int]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()  # memory() may read the cache from another thread
        self._pending: dict[tuple[str, str], _Flight] = {}
        self.compiled = 0  # grammars compiled (cache misses), for tests and telemetry
        self.compiles: Counter[str] = Counter()  # the same by scope (tenant, or SHARED)

    def start(self) -> None:
        """Start the compile workers' forkserver and one warm worker, in the background."""
        self.workers.prestart()

    def close(self) -> None:
        """Kill the compile workers (a compile still running answers 500)."""
        self.workers.close()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model reads it (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def pretokens(self, text: str) -> list[int]:
        """Where the words of `text` start, as the tokenizer splits text before merging."""
        split = self.tokenizer.pre_tokenizer
        return [start for _, (start, _) in split.pre_tokenize_str(text)] if split else [0]

    def wrapper_tokens(self, tools: Sequence[dict[str, Any]]) -> int:
        """Tokens of the longest call wrapper among `tools` (its head and tail): what KV
        admission reserves on top of `max_tokens` for the forced part of one call."""
        names = sorted({t["function"]["name"] for t in tools})
        if not names:
            return 0
        heads = self.tokenizer.encode_batch([call_head(n) for n in names],
                                            add_special_tokens=False)
        return max(len(h.ids) for h in heads) + len(self.encode(CALL_TAIL))

    def check_size(self, param: str, value: Any) -> None:
        size = len(json.dumps(value))
        if size > self.limits.max_schema_bytes:
            raise InvalidRequest(
                f"'{param}' is {size} bytes as JSON; this model constrains output with schemas "
                f"of at most {self.limits.max_schema_bytes} bytes.", param=param,
                code="schema_too_large")

    def scope(self, tenant: str) -> str:
        """The cache scope of a tenant's grammars: its own under `isolated`."""
        return tenant if self.limits.cache == "isolated" else ""

    def cache_sizes(self) -> dict[str, int]:
        """Bytes of compiled grammars cached, by scope (tenant, or SHARED)."""
        out: Counter[str] = Counter()
        with self._lock:
            for (scope, _), (_, size) in self._cache.items():
                out[scope or SHARED] += size
        return dict(out)

    def cached(self, grammar: str, tenant: str = "") -> xgr.CompiledGrammar | None:
        """The cached compile of `grammar` for `tenant`, if any (no LRU update)."""
        with self._lock:
            entry = self._cache.get((self.scope(tenant), grammar))
        return entry[0] if entry is not None else None

    async def constraint(self, grammar: str, param: str, tenant: str = "",
                         request_id: str = "") -> Constraint:
        """A fresh Constraint for `grammar` (compiled once per cache scope, then taken from
        the cache). `request_id` names the request in the log when the compile is refused."""
        key = (self.scope(tenant), grammar)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is not None:
            compiled = entry[0]
        else:
            compiled = await self._join(key, grammar, param, tenant, request_id)
        banned = self.controls if grammar.startswith(JSON) or not _free_text(grammar) else None
        return Constraint(xgr.GrammarMatcher(compiled), self.vocab, self.eos_ids, self.utf8,
                          banned, self.encode, self.pieces,
                          self.pretokens if self.tokenizer.pre_tokenizer is not None else None)

    async def _join(self, key: tuple[str, str], grammar: str, param: str, tenant: str,
                    request_id: str) -> xgr.CompiledGrammar:
        """Wait for the one compile of `key` (starting it when none runs). When every request
        waiting for it has gone away, it is cancelled, which kills its worker."""
        flight = self._pending.get(key)
        if flight is None:
            flight = self._pending[key] = _Flight()
            flight.task = asyncio.ensure_future(
                self._compile(flight, key, grammar, param, tenant, request_id))
            flight.task.add_done_callback(lambda t: self._settled(key, flight, t))
        task = flight.task
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not task.done() and not flight.committed:
                self._forget(key, flight)  # the last waiter went away: stop the worker
                task.cancel()

    def _settled(self, key: tuple[str, str], flight: _Flight,
                 task: asyncio.Future[xgr.CompiledGrammar]) -> None:
        self._forget(key, flight)
        if not task.cancelled() and flight.waiters == 0:
            task.exception()  # retrieved: a compile nobody waited for any more

    def _forget(self, key: tuple[str, str], flight: _Flight) -> None:
        if self._pending.get(key) is flight:
            del self._pending[key]

    async def _compile(self, flight: _Flight, key: tuple[str, str], grammar: str, param: str,
                       tenant: str, request_id: str) -> xgr.CompiledGrammar:
        compile_here: Callable[[], xgr.CompiledGrammar]
        if grammar.startswith(JSON):
            kind, text = JSON_SCHEMA, grammar[len(JSON):]

            def compile_here() -> xgr.CompiledGrammar:
                return self.compiler.compile_json_schema(text, any_whitespace=False)
        else:
            kind, text = STRUCTURAL_TAG, grammar[len(TAG):]

            def compile_here() -> xgr.CompiledGrammar:
                return self.compiler.compile_structural_tag(text)
        limits = self.limits
        async with contextlib.AsyncExitStack() as stack:
            try:  # the wait for a slot is not the request's fault: apart from its deadline
                async with asyncio.timeout(limits.queue_timeout_s):
                    await stack.enter_async_context(cpu.pool().slot(tenant))
            except TimeoutError:
                raise Unavailable("Grammar compilation is busy; retry the request.",
                                  param=param, code="grammar_compile_busy",
                                  retry_after=limits.compile_timeout_s) from None
            try:
                await self.workers.check(kind, text, limits.compile_timeout_s)
            except CompileTimeout:
                raise InvalidRequest(
                    f"'{param}' did not compile to a grammar within "
                    f"{limits.compile_timeout_s:g} s; simplify the schema.", param=param,
                    code="schema_too_complex") from None
            except CompileRefused as exc:
                log.warning("request %s: the grammar compiler refused '%s': %s", request_id,
                            param, exc.detail.strip())
                raise InvalidRequest(refusal_message(param, exc.detail), param=param,
                                     code="invalid_schema") from None
            except CompileFailed as exc:
                log.error("request %s: grammar compile of '%s' failed: %s", request_id, param,
                          exc)
                raise BackendError(f"'{param}' could not be compiled to a grammar (the "
                                   "compiler failed); retry the request.", 500,
                                   "grammar_compile_failed", param=param) from None
            flight.committed = True
        # It compiled in time: compiled again here, the same bounded work, on a pool thread
        # (nice 10, the GIL released; a slot of the tenant's again), finished and cached even
        # when every request went away meanwhile.
        try:
            compiled = await cpu.pool().run(tenant, compile_here)
        except (RuntimeError, ValueError) as exc:  # not seen: the worker compiled the same
            log.error("request %s: '%s' compiled in a worker, not here: %s", request_id, param,
                      exc)
            raise BackendError(f"'{param}' could not be compiled to a grammar; retry the "
                               "request.", 500, "grammar_compile_failed", param=param) from None
        self._store(key, compiled)
        return compiled

    def _store(self, key: tuple[str, str], compiled: xgr.CompiledGrammar) -> None:
        size = int(compiled.memory_size_bytes)
        with self._lock:
            self.compiled += 1
            self.compiles[key[0] or SHARED] += 1
            if size > self.limits.cache_bytes:  # larger than the whole cache: used, not kept
                return
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= old[1]
            self._cache[key] = (compiled, size)
            self._cache_bytes += size
            while self._cache_bytes > self.limits.cache_bytes:
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cache_bytes -= evicted
