"""Validate OpenAI request bodies; every problem is a 400 that names its param."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson

from gateway.core.context import Prompt, SamplingParams
from gateway.core.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.core.fields import integer
from gateway.core.media import is_json_media

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128  # choices per request (OpenAI's bound)
LIMIT_FIELDS = {"chat": ("max_completion_tokens", "max_tokens"), "completion": ("max_tokens",),
                "responses": ("max_output_tokens",), "embeddings": ()}


def check_user(body: dict[str, Any]) -> None:
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


def output_limit(body: dict[str, Any], kind: str) -> tuple[str, int | None]:
    """(the field that names the answer's length limit, its value or None if none is sent).
    Chat takes max_completion_tokens over the older max_tokens, as OpenAI does."""
    fields = LIMIT_FIELDS[kind]
    for name in fields:
        value = integer(body, name, 1, 1 << 31)
        if value is not None:
            return name, value
    return (fields[0] if fields else ""), None


def sampling(body: dict[str, Any], kind: str) -> SamplingParams:
    """What the gateway reads of any generation request: the limit and n (for admission) and,
    for telemetry, the common sampling fields when they are what OpenAI says they are. The
    rest is the backend's to read: remote kinds forward the body, the local engine reads its
    fields (backends/local/request.py)."""
    _, max_tokens = output_limit(body, kind)
    n = integer(body, "n", 1, MAX_N) if kind in ("chat", "completion") else None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) and stop else (
        [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else [])
    seed = body.get("seed")
    return SamplingParams(
        max_tokens=max_tokens,
        n=n or 1,
        temperature=_soft(body, "temperature", 1.0),
        top_p=_soft(body, "top_p", 1.0),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        stop=stops,
        presence_penalty=_soft(body, "presence_penalty", 0.0),
        frequency_penalty=_soft(body, "frequency_penalty", 0.0),
        ignore_eos=body.get("ignore_eos") is True,
    )


def _soft(body: dict[str, Any], name: str, default: float) -> float:
    """A number field for telemetry: its value when it is a number, else the default (the
    backend that serves the request judges it)."""
    value = body.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages as sent (each an object with a known role); their content is the
    backend's to read."""
    raw = body.get("messages")
    if raw is None:
        raise InvalidRequest("'messages' is required.", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be a list.", param="messages", code="invalid_type")
    if not raw:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages",
                             code="invalid_value")
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
    return raw


def prompt(body: dict[str, Any], name: str = "prompt") -> Prompt:
    """A completion's prompt (or an embedding's input): a string, a list of strings, a list of
    token ids, or a list of lists of token ids (OpenAI's four forms), never empty."""
    raw = body.get(name)
    if raw is None:
        raise InvalidRequest(f"'{name}' is required.", param=name, code="missing_required_parameter")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and raw:
        if all(isinstance(p, str) for p in raw) or _token_ids(raw):
            return raw
        if all(isinstance(p, list) and p and _token_ids(p) for p in raw):
            return raw
    raise InvalidRequest(f"'{name}' must be a string, a list of strings, a list of token ids or "
                         "a list of lists of token ids, and not empty.", param=name,
                         code="invalid_type")


def _token_ids(values: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in values)


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
    if not _long_digits(body):  # orjson reads integers past 64 bits as floats
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(body)  # the common case, fast
    if data is _STDLIB_PARSE_FAILED:
        data = _parse_json_stdlib(bytes(body))  # same answer and errors as before
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


_STDLIB_PARSE_FAILED = object()
# 19 digits in a row anywhere in the body: mapped to b"1" (every other byte to b"0") and
# searched as a substring, both at C speed (a regex took 36 ms on a 3.5 MB body: on the event
# loop, for every tenant; this takes about 3)
_DIGIT_MAP = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_DIGIT_RUN = b"1" * 19


def _long_digits(body: bytes | bytearray) -> bool:
    return _DIGIT_RUN in body.translate(_DIGIT_MAP)


def _parse_json_stdlib(body: bytes) -> Any:
    """json.loads, whose behaviour is the reference: NaN/Infinity literals and integers past
    64 bits parse (and the validators name the param), UTF-16/32 bodies are decoded. orjson
    refuses those, so a body orjson refuses is parsed again here."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidRequest(f"The request body is {reason}.", code="invalid_json") from None
