"""Validate OpenAI request bodies; every problem is a 400 that names its param."""

from __future__ import annotations

import contextlib
import json
import re
from typing import TYPE_CHECKING, Any

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
from gateway.usage import MAX_METADATA_KEY, MAX_METADATA_KEYS, MAX_METADATA_VALUE

if TYPE_CHECKING:
    from gateway.settings import RequestBounds

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128  # choices per request (OpenAI's bound)
LIMIT_FIELDS = {"chat": ("max_completion_tokens", "max_tokens"), "completion": ("max_tokens",),
                "responses": ("max_output_tokens",), "embeddings": ()}


def check_user(body: dict[str, Any]) -> None:
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidRequest("'user' must be a string.", param="user", code="invalid_type")


def check_metadata(body: dict[str, Any]) -> None:
    """`metadata`, as OpenAI bounds it: an object of at most 16 string values, keys of at most
    64 characters, values of at most 512."""
    raw = body.get("metadata")
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise InvalidRequest("'metadata' must be an object of strings.", param="metadata",
                             code="invalid_type")
    if len(raw) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"'metadata' has {len(raw)} keys; at most {MAX_METADATA_KEYS} are "
                             "allowed.", param="metadata", code="invalid_value")
    for key, value in raw.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(f"'metadata' keys are at most {MAX_METADATA_KEY} characters.",
                                 param="metadata", code="invalid_value")
        param = f"metadata.{key}"
        if not isinstance(value, str):
            raise InvalidRequest(f"'{param}' must be a string.", param=param, code="invalid_type")
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"'{param}' is longer than {MAX_METADATA_VALUE} characters.",
                                 param=param, code="invalid_value")


def check_responses(body: dict[str, Any]) -> None:
    """What OpenAI checks of a Responses request's own fields before anything else, whatever
    backend serves it: `instructions` a string or a list (of input items), `text` an object."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str | list):
        raise InvalidRequest("'instructions' must be a string or a list of input items.",
                             param="instructions", code="invalid_type")
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object.", param="text", code="invalid_type")
    if isinstance(text, dict) and text.get("format") is not None and not isinstance(
            text["format"], dict):
        raise InvalidRequest("'text.format' must be an object.", param="text.format",
                             code="invalid_type")


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
    except RecursionError:
        param = _deep_param(body)
        raise InvalidRequest(f"'{param or 'the request body'}' is nested too deeply (more "
                             f"than {MAX_NESTING} levels).", param=param,
                             code="nesting_too_deep") from None
    except ValueError as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidRequest(f"The request body is {reason}.", code="invalid_json") from None


MAX_NESTING = 256  # server.request_bounds.max_nesting's ceiling (parsers refuse ~1,000 levels)
# a JSON string (a key when a colon follows), or a bracket
_JSON_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?|[\[\]{}]')


def _deep_param(body: bytes) -> str | None:
    """The top-level field whose value nests past MAX_NESTING, read from the bytes of a body
    too deep to parse (strings skipped at C speed, one step per bracket or string)."""
    depth = 0
    field: bytes | None = None
    for m in _JSON_TOKEN.finditer(body):
        if m.group(1) is not None:
            if depth == 1 and m.group(2) is not None:
                field = m.group(1)
            continue
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > MAX_NESTING:
                break
        else:
            depth -= 1
    if field is None or depth <= MAX_NESTING:
        return None
    try:
        name = json.loads(b'"' + field + b'"')
    except ValueError:
        return None
    return name[:64] if isinstance(name, str) and _valid_unicode(name) else None


# ---- server.request_bounds and valid Unicode: right after the parse, before anything else ----

_CONTAINERS = frozenset({dict, list})
_Path = tuple[Any, str | int] | None  # (the parent's path, this key or index), None: the body


def check_bounds(body: dict[str, Any], kind: str, bounds: RequestBounds) -> None:
    """server.request_bounds and valid Unicode on a parsed body, before the model is resolved
    and before anything that costs CPU: the counts (messages or input items, stop strings,
    logit_bias entries) first, then the nesting and a lone surrogate anywhere (JSON's \\uD800
    escapes carry them and nothing downstream can encode one), then the schemas' summed size.
    Each a 400 naming the param."""
    listed = "messages" if kind == "chat" else "input" if kind == "responses" else None
    if listed is not None:
        items = body.get(listed)
        if isinstance(items, list) and len(items) > bounds.max_messages:
            raise InvalidRequest(
                f"'{listed}' has {len(items)} items; at most {bounds.max_messages} are allowed.",
                param=listed, code="array_above_max_length")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > bounds.max_stop:
        raise InvalidRequest(f"'stop' has {len(stop)} sequences; at most {bounds.max_stop} are "
                             "allowed.", param="stop", code="array_above_max_length")
    bias = body.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > bounds.max_logit_bias:
        raise InvalidRequest(f"'logit_bias' has {len(bias)} entries; at most "
                             f"{bounds.max_logit_bias} are allowed.", param="logit_bias",
                             code="invalid_value")
    check_nesting_and_unicode(body, bounds.max_nesting)
    if isinstance(bias, dict):
        for key in bias:  # token ids; a 5,000-digit key must not reach int()
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise InvalidRequest("'logit_bias' keys must be token ids (decimal integers of "
                                     "at most 10 digits).", param="logit_bias",
                                     code="invalid_value")
    check_schema_bytes(body, bounds.max_schema_bytes)


def check_nesting_and_unicode(body: dict[str, Any], max_nesting: int) -> None:
    """No object or array deeper than `max_nesting` (the body is level 1), no string or key
    holding a lone surrogate. Iterative, never recursive: level by level, each level's
    containers gathered by one comprehension (a pathological body of 500,000 empty lists costs
    about a third of its parse). Unicode is checked by one orjson.dumps (C speed; it refuses
    surrogates); only a body it refuses has its strings looked at one by one."""
    try:
        orjson.dumps(body)
        strings = False  # valid Unicode throughout: only the nesting is left to check
    except orjson.JSONEncodeError:  # a surrogate, an integer past 64 bits, or very deep
        strings = True
    levels: list[list[Any]] = [[body]]
    while True:
        level = levels[-1]
        if strings:
            _check_strings(levels)
        deeper = [v for c in level for v in (c.values() if type(c) is dict else c)
                  if type(v) in _CONTAINERS]
        if not deeper:
            return
        if len(levels) == max_nesting:
            param = param_path(_path_of(levels, deeper[0]), 3)
            raise InvalidRequest(f"'{param}' is nested more than {max_nesting} levels deep.",
                                 param=param, code="nesting_too_deep")
        levels.append(deeper)


def _check_strings(levels: list[list[Any]]) -> None:
    """The last level's keys and string values: valid Unicode, or a 400 naming the first bad."""
    for c in levels[-1]:
        if type(c) is dict:
            for key, value in c.items():
                if not _valid_unicode(key):
                    where = param_path(_path_of(levels[:-1], c))
                    raise InvalidRequest(
                        f"A key of '{where or 'the request body'}' is not valid Unicode (a lone "
                        "surrogate).", param=where, code="invalid_unicode")
                if type(value) is str and not _valid_unicode(value):
                    _bad_string(levels, c, key)
        else:
            for i, value in enumerate(c):
                if type(value) is str and not _valid_unicode(value):
                    _bad_string(levels, c, i)


def _bad_string(levels: list[list[Any]], container: Any, key: str | int) -> None:
    param = param_path((_path_of(levels[:-1], container), key))
    raise InvalidRequest(f"'{param}' is not valid Unicode (a lone surrogate).", param=param,
                         code="invalid_unicode")


def _path_of(levels: list[list[Any]], obj: Any) -> _Path:
    """Where `obj` (a container one level below `levels[-1]`, or the body) is: its parent
    found by identity in the level above, and so on up (only on the way to a 400)."""
    path: list[str | int] = []
    for level in reversed(levels):
        for c in level:
            pairs = c.items() if type(c) is dict else enumerate(c)
            key = next((k for k, v in pairs if v is obj), None)
            if key is not None:
                path.append(key)
                obj = c
                break
    out: _Path = None
    for key in reversed(path):
        out = (out, key)
    return out


def _valid_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def param_path(path: _Path, limit: int | None = None) -> str | None:
    """`messages[0].content` from a walk's (parent, key) chain; `limit`: only the first so many
    names (an index stays with its name, arrays in arrays give one), for a path that may be
    long."""
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    out: list[str] = []
    for key in reversed(keys):
        if isinstance(key, int):
            if limit is not None and out and out[-1].endswith("]"):
                break  # arrays in arrays: the first index is enough
            if out:
                out[-1] += f"[{key}]"
                continue
            key = f"[{key}]"
        if limit is not None and len(out) == limit:
            break
        out.append(key[:64])
    return ".".join(out) or None


def schemas(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every JSON schema a request carries, with its param: response_format's, each tool's
    parameters (chat's `function.parameters`, Responses' `parameters`, the deprecated
    `functions`), and the Responses `text.format` schema."""
    out: list[tuple[str, Any]] = []
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(spec, dict) and "schema" in spec:
        out.append(("response_format.json_schema.schema", spec["schema"]))
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and "schema" in fmt:
        out.append(("text.format.schema", fmt["schema"]))
    for name in ("tools", "functions"):
        tools = body.get(name)
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and "parameters" in fn:
                out.append((f"{name}[{i}].function.parameters", fn["parameters"]))
            elif isinstance(tool, dict) and "parameters" in tool:
                out.append((f"{name}[{i}].parameters", tool["parameters"]))
    return out


def check_schema_bytes(body: dict[str, Any], limit: int) -> None:
    """The request's schemas together, as JSON, within `limit` bytes (before any grammar is
    compiled or a schema forwarded): 400 schema_too_large naming the schema that passes it."""
    total = 0
    for param, schema in schemas(body):
        if schema is None:
            continue
        try:
            total += len(orjson.dumps(schema))
        except orjson.JSONEncodeError:  # an integer past 64 bits (checked Unicode, nesting)
            total += len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
        if total > limit:
            raise InvalidRequest(
                f"The request's JSON schemas (response_format, tools' parameters, text.format) "
                f"are more than {limit} bytes as JSON together, at '{param}'; at most {limit} "
                "are allowed.", param=param, code="schema_too_large")
