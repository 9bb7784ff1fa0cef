"""The Responses API over chat completions, for backends without it (the local engine; an
upstream with `responses_api: via_chat`): a Responses request becomes a chat request
(`to_chat`), and the chat answer becomes a Response object (`from_chat`) or the Responses
stream events (`stream_events`). The gateway stores nothing: `store: true`,
`previous_response_id` and `conversation` are a 400 here (a native upstream gets them as sent).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import GatewayError, InvalidRequest
from gateway.shutdown import Drain

log = logging.getLogger("gateway.responses")

# Responses fields with a chat counterpart of the same name and meaning.
_SAME = ("model", "stream", "temperature", "top_p", "parallel_tool_calls", "user", "metadata",
         "service_tier", "prompt_cache_key", "safety_identifier", "top_logprobs", "seed")
# Accepted and recorded, with nothing to do here.
_NOTHING = ("include", "truncation", "background", "stream_options", "prompt_cache_retention")
_STATELESS = {"previous_response_id": "previous_response_id", "conversation": "conversation"}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat request that serves it; a 400 naming the field for
    what chat cannot carry."""
    chat: dict[str, Any] = {k: body[k] for k in _SAME if k in body}
    for name in body:
        if name in _STATELESS and body[name] is not None:
            raise _bad(name, f"'{name}' needs a stored conversation; this model's backend "
                             "stores nothing (send the whole conversation as input).")
    if body.get("store") is True:
        raise _bad("store", "'store: true' is not served: this model's backend stores no "
                            "responses. Send store: false.")
    if body.get("background"):
        raise _bad("background", "'background' responses are not served by this model.")
    known = {*_SAME, *_NOTHING, *_STATELESS, "store", "input", "instructions", "tools",
             "tool_choice", "text", "max_output_tokens", "reasoning"}
    for name in body:
        if name not in known:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                 code="unknown_parameter")
    messages: list[dict[str, Any]] = []
    calls: set[str] = set()  # the function calls' ids so far: an output answers one of them
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        messages += _messages(instructions, "instructions", calls)
    messages += _messages(body.get("input"), "input", calls)
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("tools"):
        chat["tools"] = [_tool(t, i) for i, t in enumerate(_list(body["tools"], "tools"))]
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None and (not isinstance(fmt, dict)
                            or fmt.get("type") not in ("text", "json_schema", "json_object")):
        raise InvalidRequest("'text.format.type' must be 'text', 'json_object' or 'json_schema'.",
                             param="text.format.type", code="invalid_value")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("'text.format.schema' must be a JSON schema object.",
                                 param="text.format.schema", code="invalid_value")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be a list.", param=param, code="invalid_type")
    return value


def _tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise _bad(f"tools[{i}]", f"tools of type {kind!r} are not served by this model; "
                                  "only function tools are.")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


_ROLES = ("user", "assistant", "system", "developer")


def _string(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}.{name}' must be a string.", param=f"{param}.{name}",
                             code="invalid_type" if value is not None else
                             "missing_required_parameter")
    return value


def _text(content: Any, param: str) -> Any:
    """Responses content parts -> chat content parts (text as text, images as image_url)."""
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidRequest(f"'{param}.content' is required.", param=f"{param}.content",
                             code="missing_required_parameter")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(_list(content, f"{param}.content")):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"{param}.content[{j}]"
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _string(part, "text", where)})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _string(part, "refusal", where)})
        else:
            raise _bad(where, f"content parts of type {kind!r} are not served.")
    return parts


def _messages(items: Any, name: str, calls: set[str]) -> list[dict[str, Any]]:
    """Input items (of `input` or `instructions`) -> chat messages; `calls`: the call ids of
    the function calls before these items (an output must answer one, as OpenAI checks)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if items is None:
        raise InvalidRequest(f"'{name}' is required.", param=name,
                             code="missing_required_parameter")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(_list(items, name)):
        param = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise InvalidRequest(f"'{param}.role' must be one of "
                                     + ", ".join(repr(r) for r in _ROLES) + ".",
                                     param=f"{param}.role", code="invalid_value")
            out.append({"role": role, "content": _text(item.get("content"), param)})
        elif kind == "function_call":
            call_id = _string(item, "call_id", param)
            call = {"id": call_id, "type": "function",
                    "function": {"name": _string(item, "name", param),
                                 "arguments": _string(item, "arguments", param)}}
            calls.add(call_id)
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            if call_id not in calls:
                raise InvalidRequest(
                    f"No function call with call_id '{call_id[:64]}' comes before '{param}' in "
                    "the input (this model's backend stores no earlier responses).",
                    param=f"{param}.call_id", code="invalid_value")
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": output if isinstance(output, str) else orjson.dumps(output).decode()})
        elif kind == "reasoning":
            continue  # a reasoning summary from an earlier turn: nothing chat can carry
        else:
            raise _bad(param, f"input items of type {kind!r} are not served by this model.")
    return out


# ---- the answer -----------------------------------------------------------------------------


def _usage(u: Usage | dict[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return None
    if isinstance(u, Usage):
        prompt, completion, cached = u.prompt_tokens, u.completion_tokens, u.cached_tokens
    else:
        prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _response(ctx: RequestContext, status: str, output: list[dict[str, Any]],
              usage: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
    body = ctx.body
    fmt = body.get("response_format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        fmt = {"type": "json_schema", **fmt.get("json_schema", {})}
    tools = [{"type": "function", **t["function"]} for t in body.get("tools") or ()]
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        choice = {"type": "function", "name": (choice.get("function") or {}).get("name")}
    return {
        "id": "resp_" + ctx.request_id, "object": "response", "created_at": int(ctx.created),
        "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "instructions": None, "max_output_tokens": body.get("max_completion_tokens"),
        "model": ctx.target_model, "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "store": False, "temperature": body.get("temperature", 1.0), "text": {"format": fmt},
        "tool_choice": choice, "tools": tools, "top_p": body.get("top_p", 1.0),
        "truncation": "disabled", "usage": usage, "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _message_item(ctx: RequestContext, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + ctx.request_id, "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(ctx: RequestContext, k: int, call: dict[str, Any], status: str = "completed"
               ) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": f"fc_{ctx.request_id}_{k}", "status": status,
            "call_id": call.get("id") or f"call_{ctx.request_id}_{k}",
            "name": fn.get("name") or "", "arguments": fn.get("arguments") or ""}


def from_chat(ctx: RequestContext, answer: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (the gateway's or an upstream's) as a Response object."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(ctx, message["content"]))
    for k, call in enumerate(message.get("tool_calls") or ()):
        output.append(_call_item(ctx, k, call))
    finish = choice.get("finish_reason")
    status = "incomplete" if finish == "length" else "completed"
    if output:
        output[-1]["status"] = status  # the item the length limit cut (the last one)
    return _response(ctx, status, output, _usage(answer.get("usage")), finish)


class _Stream:
    """Chat deltas in, Responses events out (one message item, then any function calls)."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.seq = 0
        self.text: list[str] | None = None  # the message item, once opened
        self.calls: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.usage: Usage | dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def start(self) -> list[bytes]:
        r = _response(self.ctx, "in_progress", [], None)
        return [self.event("response.created", response=r),
                self.event("response.in_progress", response=r)]

    def feed(self, text: str, calls: list[dict[str, Any]]) -> list[bytes]:
        out: list[bytes] = []
        ctx = self.ctx
        if text:
            if self.text is None:
                self.text = []
                out.append(self.event("response.output_item.added", output_index=0,
                                      item=_message_item(ctx, "", "in_progress") | {"content": []}))
                out.append(self.event("response.content_part.added", item_id="msg_" + ctx.request_id,
                                      output_index=0, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": []}))
            self.text.append(text)
            out.append(self.event("response.output_text.delta", item_id="msg_" + ctx.request_id,
                                  output_index=0, content_index=0, delta=text, logprobs=[]))
        for delta in calls:
            k = delta.get("index", len(self.calls))
            index = k + (self.text is not None)
            if k >= len(self.calls):
                self.calls.append({"id": delta.get("id"), "function": {
                    "name": (delta.get("function") or {}).get("name") or "", "arguments": ""}})
                item = _call_item(ctx, k, self.calls[k], "in_progress")
                out.append(self.event("response.output_item.added", output_index=index, item=item))
            args = (delta.get("function") or {}).get("arguments") or ""
            if args:
                self.calls[k]["function"]["arguments"] += args
                out.append(self.event("response.function_call_arguments.delta",
                                      item_id=f"fc_{ctx.request_id}_{k}", output_index=index,
                                      delta=args))
        return out

    def end(self) -> list[bytes]:
        ctx = self.ctx
        out: list[bytes] = []
        output: list[dict[str, Any]] = []
        status = "incomplete" if self.finish == "length" else "completed"
        last = len(self.calls) - 1 if self.calls else -1  # the item a length limit cut
        if self.text is not None:
            text = "".join(self.text)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item_id = "msg_" + ctx.request_id
            out.append(self.event("response.output_text.done", item_id=item_id, output_index=0,
                                  content_index=0, text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item_id, output_index=0,
                                  content_index=0, part=part))
            item = _message_item(ctx, text, status if last < 0 else "completed")
            out.append(self.event("response.output_item.done", output_index=0, item=item))
            output.append(item)
        for k, call in enumerate(self.calls):
            index = k + (self.text is not None)
            item = _call_item(ctx, k, call, status if k == last else "completed")
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                  output_index=index, arguments=item["arguments"], name=item["name"]))
            out.append(self.event("response.output_item.done", output_index=index, item=item))
            output.append(item)
        final = _response(ctx, status, output, _usage(self.usage), self.finish)
        out.append(self.event(f"response.{status}", response=final))
        return out


def _deltas(chunk: Chunk) -> tuple[str, list[dict[str, Any]], str | None]:
    """A chunk's text, tool-call deltas and finish, whether the gateway's or an upstream's."""
    if chunk.event is None:
        return chunk.text, chunk.tool_calls or [], chunk.ended or chunk.finish_reason
    text, finish = "", None
    calls: list[dict[str, Any]] = []
    for choice in chunk.event.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content") or ""
            calls = delta.get("tool_calls") or []
            finish = choice.get("finish_reason")
    return text, calls, finish


async def stream_events(ctx: RequestContext, chunks: AsyncGenerator[Chunk, None],
                        first: Chunk | None, drain: Drain) -> AsyncGenerator[bytes, None]:
    """The Responses stream of a chat generation; a failure after the first byte is an
    `error` event, and the stream ends without response.completed."""
    s = _Stream(ctx)
    pending = s.start()
    try:
        chunk = first
        while chunk is not None:
            text, calls, finish = _deltas(chunk)
            pending += s.feed(text, calls)
            s.finish = finish or s.finish
            if chunk.usage is not None:
                s.usage = chunk.usage
            if chunk.finish_reason is not None:
                break
            if not chunk.more and pending:
                yield b"".join(pending)
                pending = []
            try:
                chunk = await drain.next(chunks)
            except StopAsyncIteration:
                break
        yield b"".join([*pending, *s.end()])
    except GatewayError as exc:
        yield b"".join([*pending, s.event("error", code=exc.code, message=exc.message, param=exc.param)])
    except Exception:
        log.exception("request %s failed mid-stream", ctx.request_id)
        yield b"".join([*pending, s.event("error", code="server_error", param=None,
                                          message="The backend failed while streaming this response.")])
    finally:
        await chunks.aclose()
