"""A streamed answer as the whole answer: what an upstream streamed to a request the client
asked for whole (some upstreams stream whatever they are asked). The chunk events of chat or
completions become one `chat.completion` / `text_completion`: every choice's content, text,
reasoning content and refusal concatenated, its tool calls assembled by index, its logprobs
joined, its finish_reason; the envelope (id, created, model, system_fingerprint, any field
no client knows) from the first event, the usage from the last that had one."""

from __future__ import annotations

from typing import Any

_TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def merge(events: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        for key, value in event.items():
            if key not in ("choices", "usage", "object"):
                answer.setdefault(key, value)
        if event.get("usage") is not None:
            answer["usage"] = event["usage"]
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = int(choice.get("index") or 0)
            whole = choices.setdefault(index, _empty(index, chat))
            _add(whole, choice, chat)
    answer["object"] = "chat.completion" if chat else "text_completion"
    answer["choices"] = [choices[i] for i in sorted(choices)]
    answer.setdefault("usage", None)
    return answer


def _empty(index: int, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": None},
                "logprobs": None, "finish_reason": None}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": None}


def _add(whole: dict[str, Any], choice: dict[str, Any], chat: bool) -> None:
    if choice.get("finish_reason") is not None:
        whole["finish_reason"] = choice["finish_reason"]
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        mine = whole["logprobs"] = whole["logprobs"] or {}
        for key, value in lp.items():
            if isinstance(value, list):
                mine[key] = (mine.get(key) or []) + value
            else:
                mine.setdefault(key, value)
    if not chat:
        whole["text"] += choice.get("text") or ""
        return
    message = whole["message"]
    for key, value in (choice.get("delta") or {}).items():
        if key in _TEXT_FIELDS and isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        elif key == "tool_calls" and isinstance(value, list):
            calls = message.setdefault("tool_calls", [])
            for delta in value:
                i = int(delta.get("index") or 0)
                while len(calls) <= i:
                    calls.append({"id": None, "type": "function",
                                  "function": {"name": "", "arguments": ""}})
                call, fn = calls[i], delta.get("function") or {}
                call["id"] = delta.get("id") or call["id"]
                call["type"] = delta.get("type") or call["type"]
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
        elif key != "role" and value is not None:
            message.setdefault(key, value)
