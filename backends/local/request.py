"""The local engine's reading of an OpenAI request body (ctx.body): every field it serves,
checked as OpenAI checks it; fields that change nothing here accepted (and recorded by the
gateway); anything else a 400 naming the field, as OpenAI answers an unknown one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gateway.core.context import RequestContext
from gateway.core.errors import InvalidRequest
from gateway.core.fields import flag, integer, number, unsupported

# Accepted, with nothing to do on this engine (the gateway records them).
RECORDED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
_COMMON = {
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop",
    "seed", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "top_k",
    "min_p", "repetition_penalty", "ignore_eos",
} | RECORDED
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
MAX_STOPS = 64  # stop strings per request (OpenAI takes 4; more are served when asked)
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class LocalRequest:
    """What one request asks of the engine, read and checked."""

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none asked; k: the chosen token and the top k
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    echo: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "none"  # none | auto | required | the name of one function
    parallel_tool_calls: bool = True
    response_format: str = "text"  # text | json_object | json_schema
    schema: dict[str, Any] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def read(ctx: RequestContext, model: str, vocab_size: int) -> LocalRequest:
    body = ctx.body
    chat = ctx.kind == "chat"
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in known:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                 code="unknown_parameter")
    if body.get("store") is True:
        raise unsupported("store", "this gateway stores no completions (send store: false)")
    r = LocalRequest(
        n=ctx.sampling.n,
        max_tokens=ctx.sampling.max_tokens,
        temperature=number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=number(body, "top_p", 0.0, 1.0, 1.0) or 1e-9,
        top_k=integer(body, "top_k", -1, vocab_size) or 0,
        min_p=number(body, "min_p", 0.0, 1.0, 0.0),
        seed=integer(body, "seed", -(1 << 63), (1 << 63) - 1),
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=number(body, "repetition_penalty", 0.01, 10.0, 1.0),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        stop=_stops(body.get("stop")),
        ignore_eos=flag(body, "ignore_eos"),
    )
    r.top_k = max(r.top_k, 0)  # -1 is vLLM's "off", as 0
    if chat:
        _chat(body, model, r)
    else:
        _completion(body, r)
    return r


def _chat(body: dict[str, Any], model: str, r: LocalRequest) -> None:
    if flag(body, "logprobs"):
        r.logprobs = integer(body, "top_logprobs", 0, 20) or 0
    elif body.get("top_logprobs") is not None:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs",
                             code="invalid_value")
    for i, m in enumerate(body.get("messages") or ()):
        _content(m.get("content"), f"messages[{i}].content", model, m.get("role"))
        _tool_calls(m.get("tool_calls"), f"messages[{i}].tool_calls")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise InvalidRequest("'chat_template_kwargs' must be an object.",
                                 param="chat_template_kwargs", code="invalid_type")
        reserved = {"messages", "tools", "bos_token", "eos_token", "add_generation_prompt"}
        r.template_kwargs = {k: v for k, v in kwargs.items() if k not in reserved}
    r.parallel_tool_calls = body.get("parallel_tool_calls") is not False
    _tools(body, r)
    _response_format(body.get("response_format"), r)


def _completion(body: dict[str, Any], r: LocalRequest) -> None:
    r.logprobs = integer(body, "logprobs", 0, 20)
    r.echo = flag(body, "echo")
    if r.echo and r.logprobs is not None:
        raise unsupported("echo", "echo with logprobs would need the prompt's log "
                                  "probabilities, which this engine does not compute")
    best_of = integer(body, "best_of", 1, 128)
    if best_of not in (None, 1, r.n):
        raise unsupported("best_of", "best_of other than n is not served (no ranking)")
    if body.get("suffix") not in (None, ""):
        raise unsupported("suffix", "this model has no fill-in-the-middle format")


def _content(content: Any, param: str, model: str, role: Any) -> None:
    if content is None:
        if role in ("assistant", "function"):
            return
        raise InvalidRequest(f"'{param}' is required.", param=param, code="missing_required_parameter")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"'{param}' must be a string or a list of content parts.",
                             param=param, code="invalid_type")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "image"):
            raise InvalidRequest(f"The model '{model}' takes no images: it reads text only "
                                 f"('{param}[{j}]' is an image).", param=f"{param}[{j}]",
                                 code="image_not_supported")
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            continue
        raise InvalidRequest(f"The model '{model}' reads text only; '{param}[{j}]' is a part "
                             f"of type {kind!r}.", param=f"{param}[{j}]", code="invalid_value")


def _tool_calls(calls: Any, param: str) -> None:
    """An assistant message's earlier calls, as the chat template writes them: each with a
    function object whose name and arguments are strings."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{param}' must be a list.", param=param, code="invalid_type")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise InvalidRequest(f"'{param}[{j}].function' must be an object.",
                                 param=f"{param}[{j}].function", code="invalid_type")
        for name in ("name", "arguments"):
            if not isinstance(fn.get(name), str):
                where = f"{param}[{j}].function.{name}"
                raise InvalidRequest(f"'{where}' must be a string.", param=where,
                                     code="invalid_type")


def _logit_bias(value: Any, vocab_size: int) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("'logit_bias' must be an object of token ids to numbers.",
                             param="logit_bias", code="invalid_type")
    out: dict[int, float] = {}
    for key, bias in value.items():
        # ASCII digits, at most 10 (int() of a 5,000-digit string raises; '²' is a digit too)
        plain = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10
        token = int(key) if plain else -1
        shown = repr(key) if len(key) <= 24 else repr(key[:16] + "...")
        if not 0 <= token < vocab_size:
            raise InvalidRequest(f"'logit_bias' names {shown}, which is not a token id of this "
                                 f"model (0 to {vocab_size - 1}).", param="logit_bias",
                                 code="invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise InvalidRequest(f"'logit_bias[{key}]' must be a number from -100 to 100.",
                                 param="logit_bias", code="invalid_value")
        out[token] = float(bias)
    return out


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise InvalidRequest(f"'stop' takes at most {MAX_STOPS} sequences here.", param="stop",
                                 code="invalid_value")
        return [s for s in stop if s]
    raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop",
                         code="invalid_type")


def _tools(body: dict[str, Any], r: LocalRequest) -> None:
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise unsupported(name, "the deprecated functions API is not served; send tools")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("'tools' must be a list.", param="tools", code="invalid_type")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise InvalidRequest(f"'tools[{i}]' must be {{'type': 'function', 'function': "
                                     "{...}}.", param=f"tools[{i}]", code="invalid_value")
            if not isinstance(fn.get("name"), str) or not _TOOL_NAME.match(fn["name"]):
                raise InvalidRequest(f"'tools[{i}].function.name' must be 1-64 of a-z, A-Z, "
                                     "0-9, _ and -.", param=f"tools[{i}].function.name",
                                     code="invalid_value")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON schema.",
                                     param=f"tools[{i}].function.parameters", code="invalid_type")
        r.tools = tools or None
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in r.tools or ()]
    if choice is None:
        r.tool_choice = "auto" if r.tools else "none"
    elif choice in ("none", "auto", "required"):
        r.tool_choice = choice
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        r.tool_choice = str(choice["function"].get("name"))
        if r.tool_choice not in names:
            raise InvalidRequest(f"'tool_choice' names the function {r.tool_choice!r}, which is "
                                 "not in 'tools'.", param="tool_choice", code="invalid_value")
    else:
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}.",
                             param="tool_choice", code="invalid_value")
    if r.tool_choice != "none" and not r.tools:
        raise InvalidRequest("'tool_choice' needs 'tools'.", param="tool_choice",
                             code="invalid_value")


def _response_format(fmt: Any, r: LocalRequest) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema "
                                 "object.", param="response_format.json_schema.schema",
                                 code="invalid_value")
        r.response_format, r.schema = "json_schema", schema
    elif kind in ("text", "json_object"):
        r.response_format = kind
    else:
        raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or "
                             "'json_schema'.", param="response_format", code="invalid_value")
