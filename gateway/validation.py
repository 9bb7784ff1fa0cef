"""Validate OpenAI request bodies; every problem is a 400 that names its param."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import orjson

from gateway.core.context import SamplingParams
from gateway.core.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.core.media import is_json_media

ROLES = ("system", "developer", "user", "assistant", "tool")

# Fields a client may send that change nothing here.
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "ignore_eos",
} | _HARMLESS
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "response_format", "functions", "function_call",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number.", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{value} is not a valid value for '{name}': it must be between {lo:g} and {hi:g}.",
            param=name, code="invalid_value",
        )
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{value} is not a valid value for '{name}': it must be between {lo} and {hi}.",
            param=name, code="invalid_value",
        )
    return value


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], what: str) -> None:
    if name in body and body[name] not in allowed:
        raise InvalidRequest(f"'{name}' is not supported by this gateway: {what}.", param=name,
                             code="unsupported_parameter")


def check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                 code="unknown_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidRequest("'user' must be a string.", param="user", code="invalid_type")


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string.", param="model",
                             code="missing_required_parameter" if model is None else "invalid_type")
    return model


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
        if not stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.",
                                 param="stream_options")
        value = options.get("include_usage", False)
        if not isinstance(value, bool):
            raise InvalidRequest("'stream_options.include_usage' must be a boolean.",
                                 param="stream_options.include_usage")
        include_usage = value
    return bool(stream), include_usage


def sampling(body: dict[str, Any], default_max_tokens: int, *, chat: bool) -> SamplingParams:
    _unsupported(body, "n", (None, 1), "only n=1 is served")
    _unsupported(body, "logprobs", (None, False) if chat else (None,), "log probabilities are not returned")
    _unsupported(body, "logit_bias", (None, {}), "logit_bias is not applied")
    if chat:
        _unsupported(body, "top_logprobs", (None,), "log probabilities are not returned")
        _unsupported(body, "tools", (None, []), "tool calling is not served")
        _unsupported(body, "functions", (None, []), "function calling is not served")
        _unsupported(body, "tool_choice", (None, "none"), "tool calling is not served")
        _unsupported(body, "function_call", (None, "none"), "function calling is not served")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise InvalidRequest("'response_format' other than text is not supported by this gateway.",
                                 param="response_format", code="unsupported_parameter")
    else:
        _unsupported(body, "echo", (None, False), "echo is not served")
        _unsupported(body, "best_of", (None, 1), "only best_of=1 is served")
        _unsupported(body, "suffix", (None, ""), "suffix is not served")
    limit = 1 << 31
    max_tokens = _integer(body, "max_tokens", 1, limit)
    if chat:
        mct = _integer(body, "max_completion_tokens", 1, limit)
        max_tokens = mct if mct is not None else max_tokens
    seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > 4:
            raise InvalidRequest("'stop' takes at most 4 sequences.", param="stop", code="invalid_value")
        stops = [s for s in stop if s]
    else:
        raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop",
                             code="invalid_type")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0) or 1e-9,
        seed=seed,
        stop=stops,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean.", param=name, code="invalid_type")
    return value


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if raw is None:
        raise InvalidRequest("'messages' is required.", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be a list.", param="messages", code="invalid_type")
    if not raw:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages",
                             code="invalid_value")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"'{param}' must be an object.", param=param, code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"Invalid value for '{param}.role': {role!r}. Supported values are: "
                + ", ".join(repr(r) for r in ROLES) + ".",
                param=f"{param}.role", code="invalid_value",
            )
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"{param}.content", role)})
    return out


def _content(content: Any, param: str, role: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise InvalidRequest(f"'{param}' is required.", param=param, code="missing_required_parameter")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"'{param}[{j}]' must be a text part ({{'type': 'text', 'text': ...}}); "
                    "other content types are not supported.", param=f"{param}[{j}]", code="invalid_value")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"'{param}' must be a string or a list of text parts.", param=param,
                         code="invalid_type")


def prompt(body: dict[str, Any]) -> str:
    raw = body.get("prompt")
    if raw is None:
        raise InvalidRequest("'prompt' is required.", param="prompt", code="missing_required_parameter")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if not isinstance(raw, str):
        raise InvalidRequest("'prompt' must be a string (one prompt per request is served).",
                             param="prompt", code="invalid_type")
    return raw


# ---- the body itself ---------------------------------------------------------------------


def check_body_headers(ctype: str | None, declared: str | None, limit: int) -> None:
    """Content-Type JSON (or absent) and a declared Content-Length within the limit."""
    if ctype is not None and not is_json_media(ctype):  # absent: taken as JSON
        media = ctype.partition(";")[0].strip().lower()
        raise UnsupportedMediaType(
            f"Content-Type {media or '(empty)'!r} is not supported; send application/json.")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


def body_timeout(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"The request body was not received within {timeout_s:g} s.")


def parse_body(body: bytes | bytearray) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest naming what is wrong."""
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    data: Any = _STDLIB_PARSE_FAILED
    if _LONG_DIGITS.search(body) is None:  # orjson reads integers past 64 bits as floats
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(body)  # the common case, fast
    if data is _STDLIB_PARSE_FAILED:
        data = _parse_json_stdlib(bytes(body))  # same answer and errors as before
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


_STDLIB_PARSE_FAILED = object()
_LONG_DIGITS = re.compile(rb"\d{19}")


def _parse_json_stdlib(body: bytes) -> Any:
    """json.loads, whose behaviour is the reference: NaN/Infinity literals and integers past
    64 bits parse (and the validators name the param), UTF-16/32 bodies are decoded. orjson
    refuses those, so a body orjson refuses is parsed again here."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidRequest(f"The request body is {reason}.", code="invalid_json") from None
