"""What a remote kind's chunk says, for tests: the text of the upstream event or answer it
passes through (chat deltas and messages, completion text)."""

from __future__ import annotations

from gateway.core.context import Chunk


def text_of(chunk: Chunk) -> str:
    if chunk.event is None:
        return chunk.text
    parts = []
    for choice in chunk.event.get("choices") or ():
        body = choice.get("delta") or choice.get("message") or {}
        parts.append(body.get("content") or choice.get("text") or "")
    return "".join(parts)
