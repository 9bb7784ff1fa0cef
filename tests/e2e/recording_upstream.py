"""An OpenAI-compatible upstream on loopback that records every request and answers with
everything the API can carry: ids, system_fingerprint, tool calls, refusal, reasoning content,
logprobs, usage details, and a field no client knows. Streamed answers are the same answer cut
into chunk events, with `usage: null` on each and a usage event only when the request asked.

What it answers to a request's body:
- chat: `message` (settable) or, when the body has tools, a call of the first tool (or the one
  tool_choice names) with arguments made from its schema; with a json_schema response_format,
  content made from the schema (so that clients which parse it succeed);
- responses: a function_call of the first tool, or, once the input holds a function_call_output
  (or there are no tools), a message;
- completions, embeddings: a text / a vector, with usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.loop_thread import serving_in_thread
from tests.server import free_port

EXTRA = {"x_upstream_extra": {"kept": True, "n": [1, 2]}}  # a field no client knows
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 2, "accepted_prediction_tokens": 0}}
LOGPROBS = {"content": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108],
                         "top_logprobs": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]}]}],
            "refusal": None}


def example(schema: Any) -> Any:
    """A small instance of a JSON schema (what a model constrained by it could answer)."""
    if not isinstance(schema, dict):
        return None
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example(schema[key][0])
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: example(v) for k, v in props.items()}
    if kind == "array":
        return [example(schema.get("items") or {})] * max(1, schema.get("minItems", 1))
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True}.get(str(kind))


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class RecordingUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[Recorded] = []
        self.message: dict[str, Any] | None = None  # the next chat answers' message, if set

    @contextlib.contextmanager
    def running(self) -> Iterator[RecordingUpstream]:
        with serving_in_thread(self._handle, self.port):
            yield self

    def last(self, path: str) -> Recorded:
        return next(r for r in reversed(self.requests) if r.path.endswith(path))

    # ---- the wire ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v for k, v in
                           (line.split(": ", 1) for line in lines[1:] if ": " in line)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                self.requests.append(Recorded(method, path, headers, copy.deepcopy(body)))
                status, media, payload = self.answer(method, path, body)
                writer.write(f"HTTP/1.1 {status} OK\r\ncontent-type: {media}\r\n"
                             f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
        if method == "GET":
            return 200, "application/json", json.dumps({"object": "list", "data": [
                {"id": "up-model", "object": "model"}]}).encode()
        route = path.split("?")[0].removeprefix("/v1")
        if route == "/embeddings":
            data = [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 0.125]}]
            return 200, "application/json", json.dumps({
                "object": "list", "data": data, "model": body.get("model"),
                "usage": {"prompt_tokens": 5, "total_tokens": 5}}).encode()
        if route == "/responses":
            return self._responses(body)
        whole = self.chat(body) if route == "/chat/completions" else self.completion(body)
        if not body.get("stream"):
            return 200, "application/json", json.dumps(whole).encode()
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return 200, "text/event-stream", b"".join(
            b"data: " + json.dumps(e).encode() + b"\n\n" for e in stream_of(whole, usage)
        ) + b"data: [DONE]\n\n"

    # ---- answers -------------------------------------------------------------------------

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "Hello there",
                                   "refusal": None, "reasoning_content": "thinking first"}
        finish = "stop"
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        if self.message is not None:
            message = dict(self.message)
        elif tools and choice != "none" and not any(m.get("role") == "tool" for m in body["messages"]):
            named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
            fn = next((t["function"] for t in tools if t["function"]["name"] == named),
                      tools[0]["function"])
            message = {"role": "assistant", "content": None, "refusal": None,
                       "reasoning_content": "a tool knows",
                       "tool_calls": [{"id": "call_up_1", "type": "function", "function": {
                           "name": fn["name"],
                           "arguments": json.dumps(example(fn.get("parameters") or {}))}}]}
            finish = "tool_calls"
        else:
            fmt = body.get("response_format") or {}
            if fmt.get("type") == "json_schema":
                message["content"] = json.dumps(example(fmt["json_schema"].get("schema")))
        return {"id": "chatcmpl-up-123", "object": "chat.completion", "created": 1700000000,
                "model": body.get("model"), "system_fingerprint": "fp_up",
                "service_tier": "default", **EXTRA,
                "choices": [{"index": 0, "message": message, "logprobs": LOGPROBS,
                             "finish_reason": finish}],
                "usage": USAGE}

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": "cmpl-up-9", "object": "text_completion", "created": 1700000000,
                "model": body.get("model"), **EXTRA,
                "choices": [{"index": 0, "text": " and so on", "logprobs": None,
                             "finish_reason": "length"}], "usage": USAGE}

    def _responses(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        items = body.get("input") if isinstance(body.get("input"), list) else []
        answered = any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)
        tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
        if tools and not answered:
            out: dict[str, Any] = {"type": "function_call", "id": "fc_up_1", "call_id": "call_up_7",
                                   "name": tools[0]["name"], "status": "completed",
                                   "arguments": json.dumps(example(tools[0].get("parameters")))}
        else:
            out = {"type": "message", "id": "msg_up_1", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": "Done: sunny", "annotations": []}]}
        resp = {"id": "resp_up_42", "object": "response", "created_at": 1700000000,
                "status": "completed", "model": body.get("model"), "output": [out],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": body.get("tools", []),
                "usage": {"input_tokens": 13, "output_tokens": 4, "total_tokens": 17,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}, **EXTRA}
        if not body.get("stream"):
            return 200, "application/json", json.dumps(resp).encode()
        events = [{"type": "response.created", "sequence_number": 0,
                   "response": {**resp, "status": "in_progress", "output": []}},
                  {"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
                   "item": out},
                  {"type": "response.output_item.done", "sequence_number": 2, "output_index": 0,
                   "item": out},
                  {"type": "response.completed", "sequence_number": 3, "response": resp}]
        return 200, "text/event-stream", b"".join(
            f"event: {e['type']}\ndata: ".encode() + json.dumps(e).encode() + b"\n\n" for e in events)


def stream_of(whole: dict[str, Any], usage: bool) -> list[dict[str, Any]]:
    """A chat or completion answer as the chunk events an upstream streams."""
    chat = whole["object"] == "chat.completion"
    env = {k: v for k, v in whole.items() if k not in ("choices", "usage", "object")}
    env["object"] = "chat.completion.chunk" if chat else "text_completion"
    if usage:
        env["usage"] = None
    out = []
    choice = whole["choices"][0]
    if chat:
        msg = choice["message"]
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if msg.get("reasoning_content"):
            deltas.append({"reasoning_content": msg["reasoning_content"]})
        text = msg.get("content") or ""
        for piece in (text[:3], text[3:]) if text else ():
            deltas.append({"content": piece})
        for i, call in enumerate(msg.get("tool_calls") or ()):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"],
                                                        "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": i, "function": {
                "arguments": call["function"]["arguments"]}}]})
        for d in deltas:
            out.append({**env, "choices": [{"index": 0, "delta": d, "logprobs": None,
                                            "finish_reason": None}]})
        out.append({**env, "choices": [{"index": 0, "delta": {}, "logprobs": choice["logprobs"],
                                        "finish_reason": choice["finish_reason"]}]})
    else:
        out.append({**env, "choices": [{**choice, "finish_reason": None}]})
        out.append({**env, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": choice["finish_reason"]}]})
    if usage:
        out.append({**env, "choices": [], "usage": whole["usage"]})
    return out
