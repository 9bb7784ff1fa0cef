"""One shadow pair compared: the primary's answer and the candidate's, for the same request.

Greedy requests (temperature 0) by exact match and token agreement; every request by finish
reason, length ratio, validity of JSON answers and tool calls against the request's schemas,
the tool names chosen, errors, TTFT and latency ratio, and KV bytes per request. A pair's
`score` (what the agreement guard averages): 0 when the two differ in error, finish reason,
validity or tool names; else the token agreement of a greedy pair; else 1 when the lengths
are within 2x of each other, 0 when not."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from gateway.core.context import Chunk

MAX_TEXT = 64 * 1024  # characters of an answer kept for comparing
MAX_WORDS = 2048  # words compared for token agreement (SequenceMatcher is quadratic at worst)
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(slots=True)
class Answer:
    """What one side answered (its first choice), as far as the comparison needs it."""

    text: str = ""
    finish_reason: str | None = None
    tool_names: list[str] = field(default_factory=list)
    tool_arguments: list[str] = field(default_factory=list)
    error: str | None = None  # the error's code or status, when the side failed
    ttft: float | None = None  # seconds from the side's start to its first chunk
    latency: float | None = None  # seconds from the side's start to its end
    kv_bytes: int = 0  # peak KV bytes of the request (the backend's attribution)
    completion_tokens: int | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.index != 0:
            return
        if chunk.event is not None:
            self._event(chunk.event)
        else:
            self._text(chunk.text)
            self._tools(chunk.tool_calls)
        if chunk.finish_reason is not None:
            self.finish_reason = self.finish_reason or chunk.finish_reason
        if chunk.usage is not None:
            self.completion_tokens = chunk.usage.completion_tokens

    def _text(self, text: str | None) -> None:
        if text and len(self.text) < MAX_TEXT:
            self.text += text[: MAX_TEXT - len(self.text)]

    def _tools(self, calls: list[dict[str, Any]] | None) -> None:
        for call in calls or ():
            if not isinstance(call, dict):
                continue
            fn = call.get("function") or {}
            index = call.get("index", len(self.tool_names) if fn.get("name") else 0)
            if not isinstance(index, int) or index < 0 or index > 64:
                continue
            while len(self.tool_names) <= index:
                self.tool_names.append("")
                self.tool_arguments.append("")
            if isinstance(fn.get("name"), str):
                self.tool_names[index] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                self.tool_arguments[index] += fn["arguments"]

    def _event(self, event: dict[str, Any]) -> None:
        """A remote upstream's answer or stream event (chat or completions shape)."""
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            part = choice.get("message") or choice.get("delta") or {}
            if isinstance(part, dict):
                content = part.get("content")
                self._text(content if isinstance(content, str) else None)
                calls = part.get("tool_calls")
                self._tools(calls if isinstance(calls, list) else None)
            if isinstance(choice.get("text"), str):
                self._text(choice["text"])
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.completion_tokens = usage["completion_tokens"]


@dataclass(frozen=True, slots=True)
class Comparison:
    greedy: bool
    exact: bool
    token_agreement: float | None  # greedy pairs only
    finish_match: bool
    length_ratio: float | None  # candidate / primary (words)
    primary_valid: bool | None  # None: nothing to validate (no schema, no tool call)
    candidate_valid: bool | None
    tools_match: bool
    primary_error: str | None
    candidate_error: str | None
    ttft_ratio: float | None
    latency_ratio: float | None
    primary_kv_bytes: int
    candidate_kv_bytes: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def words(text: str) -> list[str]:
    return _WORDS.findall(text)[:MAX_WORDS]


def token_agreement(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).ratio()


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def validity(answer: Answer, body: dict[str, Any]) -> bool | None:
    """Whether the answer's JSON and tool calls hold to the request's schemas; None when the
    request asks for neither and the answer calls no tool."""
    checks: list[bool] = []
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema") and not answer.tool_names:
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
        checks.append(_valid_json(answer.text, schema if isinstance(schema, dict) else None))
    tools = {}
    for tool in body.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            tools[fn["name"]] = params if isinstance(params, dict) else None
    for name, args in zip(answer.tool_names, answer.tool_arguments, strict=True):
        checks.append(name in tools and _valid_json(args or "{}", tools[name]))
    return all(checks) if checks else None


def _valid_json(text: str, schema: dict[str, Any] | None) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if schema is None:
        return True
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True  # the request's schema is not one: nothing to hold the answer to
    return True


def compare(primary: Answer, candidate: Answer, body: dict[str, Any], greedy: bool) -> Comparison:
    exact = (primary.text == candidate.text and primary.tool_names == candidate.tool_names
             and primary.tool_arguments == candidate.tool_arguments)
    agreement = token_agreement(primary.text, candidate.text) if greedy else None
    finish_match = primary.finish_reason == candidate.finish_reason
    pw, cw = len(words(primary.text)), len(words(candidate.text))
    length_ratio = 1.0 if pw == cw else (cw / pw if pw else None)
    pv, cv = validity(primary, body), validity(candidate, body)
    tools_match = primary.tool_names == candidate.tool_names
    errors_match = (primary.error is None) == (candidate.error is None)
    if not errors_match or primary.error is not None or not finish_match or pv != cv \
            or not tools_match:
        score = 0.0 if not (primary.error and candidate.error) else 1.0
    elif agreement is not None:
        score = agreement
    else:
        score = 1.0 if length_ratio is not None and 0.5 <= length_ratio <= 2.0 else 0.0
    return Comparison(
        greedy=greedy, exact=exact, token_agreement=agreement, finish_match=finish_match,
        length_ratio=length_ratio, primary_valid=pv, candidate_valid=cv, tools_match=tools_match,
        primary_error=primary.error, candidate_error=candidate.error,
        ttft_ratio=_ratio(candidate.ttft, primary.ttft),
        latency_ratio=_ratio(candidate.latency, primary.latency),
        primary_kv_bytes=primary.kv_bytes, candidate_kv_bytes=candidate.kv_bytes, score=score)
