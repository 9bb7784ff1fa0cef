"""Tool calls back out of generated text: <tool_call>{"name":"f","arguments":{...}}</tool_call>
(the format the chat template teaches and the grammar enforces, `name` first, whitespace
between elements allowed) as OpenAI tool-call deltas, streamed as they complete: one delta
with the call's id and name as soon as the name is read, then its arguments as they arrive.

The markup never reaches the client, also when the output is cut (by `max_tokens`) inside a
call: a call cut in its head is dropped, one cut in its arguments keeps the arguments (a
prefix of their JSON) without the wrapper's closing brace or a partial </tool_call>."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from backends.local.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')


class ToolCallParser:
    """Feed text deltas; get (content text, tool-call deltas). Text outside calls is content."""

    def __init__(self) -> None:
        self.buf = ""
        self.state = "text"  # text | head (after <tool_call>) | args (after "arguments":)
        #                         | tail (after the arguments: `}</tool_call>`)
        self.calls = 0
        self.args = ""  # the current call's arguments sent so far
        self.scan = _Json()

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        text, calls = self._feed(delta)
        return text, merge(calls)

    def _feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.buf += delta
        text = ""
        calls: list[dict[str, Any]] = []
        while True:
            if self.state == "text":
                at = self.buf.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = _partial(self.buf, TOOL_CALL_OPEN)
                    text += self.buf[: len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return text, calls
                text += self.buf[:at]
                self.buf = self.buf[at + len(TOOL_CALL_OPEN):]
                self.state = "head"
            elif self.state == "head":
                m = _HEAD.match(self.buf)
                if m is None:
                    return text, calls
                self.buf = self.buf[m.end():]
                self.args, self.scan = "", _Json()
                calls.append({"index": self.calls, "id": "call_" + secrets.token_hex(12),
                              "type": "function",
                              "function": {"name": json.loads(m.group(1)), "arguments": ""}})
                self.state = "args"
            elif self.state == "args":
                out = self.scan.feed(self.buf)  # up to the arguments' end, when it is read
                self.buf = self.buf[len(out):]
                if out:
                    self.args += out
                    calls.append(_args(self.calls, out))
                if not self.scan.done:
                    return text, calls
                self.state = "tail"
            else:  # the wrapper's closing brace and </tool_call>, after the arguments
                end = self.buf.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return text, calls
                self.buf = self.buf[end + len(TOOL_CALL_CLOSE):]
                self.calls += 1
                self.state = "text"

    @property
    def called(self) -> bool:
        return self.calls > 0 or self.state in ("args", "tail")

    def flush(self, cut: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """At the end, what was held back: text (less a partial <tool_call> when the output
        was `cut` by its length limit); nothing of a call cut before its arguments or after
        them (its wrapper's end: its arguments were all sent)."""
        rest, self.buf = self.buf, ""
        if self.state in ("head", "tail") or (cut and self.state == "text"):
            return "", []  # markup: a call opening, or a call's closing
        if self.state == "args":  # not seen: the scan sends the arguments as they are read
            return "", [_args(self.calls, rest)] if rest else []
        return rest, []


class _Json:
    """Where one JSON value ends, read a piece at a time: strings (with their escapes) and
    nesting are followed, so markup characters inside a string are the arguments' own."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.in_string = self.escape = False
        self.done = False

    def feed(self, text: str) -> str:
        """The part of `text` that belongs to the value (all of it until the value ends)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if not self.depth:
                        return self._end(text, i)
            elif self.started and not self.depth and (ch.isspace() or ch in ",}]"):
                self.done = True  # a bare scalar ended before this character
                return text[:i]
            elif ch == '"':
                self.in_string, self.started = True, True
            elif ch in "{[":
                self.depth, self.started = self.depth + 1, True
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return self._end(text, i)
            elif not ch.isspace():
                self.started = True
        return text

    def _end(self, text: str, i: int) -> str:
        self.done = True
        return text[: i + 1]


def merge(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One delta per call in a chunk, as OpenAI streams them: a call's head and the first of
    its arguments read in one piece (forced tokens arrive together) are one delta, not two
    with the same index (clients such as instructor's partial streaming read only
    `tool_calls[0]` of a chunk)."""
    out: list[dict[str, Any]] = []
    for d in calls:
        if out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["function"].get("arguments") or ""
        else:
            out.append({**d, "function": dict(d["function"])})
    return out


def _args(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


def _partial(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
