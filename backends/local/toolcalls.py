"""Tool calls back out of generated text: <tool_call>{"name":"f","arguments":{...}}</tool_call>
(the format the chat template teaches and the grammar enforces, `name` first, whitespace
between elements allowed) as OpenAI tool-call deltas, streamed as they complete: one delta
with the call's id and name as soon as the name is read, then its arguments as they arrive."""

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
        self.calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
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
                calls.append({"index": self.calls, "id": "call_" + secrets.token_hex(12),
                              "type": "function",
                              "function": {"name": json.loads(m.group(1)), "arguments": ""}})
                self.state = "args"
            else:
                end = self.buf.find(TOOL_CALL_CLOSE)
                if end < 0:
                    keep = _held(self.buf)
                    out, self.buf = self.buf[:keep], self.buf[keep:]
                    if out:
                        calls.append(_args(self.calls, out))
                    return text, calls
                body = self.buf[:end].rstrip()  # the arguments, then the call's closing brace
                args = body[:-1].rstrip() if body.endswith("}") else body
                if args:
                    calls.append(_args(self.calls, args))
                self.buf = self.buf[end + len(TOOL_CALL_CLOSE):]
                self.calls += 1
                self.state = "text"

    @property
    def called(self) -> bool:
        return self.calls > 0 or self.state == "args"

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end, what was held back: text; a call cut short before its name, as the
        text it was; the arguments of a call cut short (by the length limit), as arguments."""
        rest, self.buf = self.buf, ""
        if self.state == "args":
            return "", [_args(self.calls, rest)] if rest else []
        return (rest if self.state == "text" else TOOL_CALL_OPEN + rest), []


def _args(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


def _held(buf: str) -> int:
    """Where to stop emitting arguments: before what may still turn out to be the call's end
    (whitespace, its closing brace, the start of </tool_call>)."""
    j = len(buf) - _partial(buf, TOOL_CALL_CLOSE)
    while j and buf[j - 1].isspace():
        j -= 1
    if j and buf[j - 1] == "}":
        j -= 1
        while j and buf[j - 1].isspace():
            j -= 1
    return j


def _partial(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
