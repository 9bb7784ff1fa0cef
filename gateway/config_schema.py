"""The config file's JSON Schema and its reference page, generated from the config types.

The dataclasses that gateway/settings.py validates a config with are the one source: this
module walks the same types by the same rules (`_bytes` integers also take "256MiB", a
one-item list may be written as its item, a union takes any of its members) and reads each
field's description from the comment beside or above it in the source. `gateway
config-schema` prints the schema; the committed copy (docs/config.schema.json) and the
reference page (docs/reference/configuration.md) are checked against it by the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any

from backends.registry import BACKEND_KINDS, backend_class
from gateway.core.config import ModelConfig, TenantConfig
from gateway.settings import ServerConfig, TelemetryConfig
from policies.redis_quotas import SharedStateConfig
from policies.registry import POLICY_KINDS

SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KkMmGgTt][Ii]?[Bb]|[Bb])?\s*$"
Schema = dict[str, Any]


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """A dataclass's field -> the comment on its line, else the comment lines just above it
    (section markers such as `# -- operations` are not descriptions)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        name = line.strip().partition(":")[0]
        if name not in names or not line.startswith(" " * 4) or line.startswith(" " * 5):
            continue
        if n in comments:
            out[name] = comments[n]
            continue
        above: list[str] = []
        k = n - 1
        while k in comments and lines[k - 1].lstrip().startswith("#"):
            if comments[k].startswith("-- "):
                break
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[name] = " ".join(above)
    return out


def type_schema(tp: Any, name: str) -> Schema:
    """The schema of one field's type, as gateway/settings.py `_convert` reads it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [type_schema(a, name) for a in args if a is not type(None)]
        if type(None) in args:
            members.append({"type": "null"})
        return members[0] if len(members) == 1 else {"anyOf": members}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if dataclasses.is_dataclass(tp):
        return object_schema(typing.cast(type, tp))
    if tp is int and name.endswith("_bytes"):
        return {"anyOf": [{"type": "integer", "minimum": 0},
                          {"type": "string", "pattern": SIZE_PATTERN}]}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if origin is tuple:
        item = type_schema(args[0], name)
        return {"anyOf": [{"type": "array", "items": item}, item]}  # one item may stand alone
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1], name)}
    if tp is Any or tp is object:
        return {}
    raise TypeError(f"{name}: no schema for {tp!r}")


def object_schema(cls: type) -> Schema:
    hints = typing.get_type_hints(cls)
    notes = field_comments(cls)
    props: dict[str, Schema] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        prop = type_schema(hints[f.name], f.name)
        if f.name in notes:
            prop = {"description": notes[f.name], **prop}
        if f.default is not dataclasses.MISSING and _jsonable(f.default):
            prop["default"] = _plain(f.default)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        props[f.name] = prop
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    doc = inspect.getdoc(cls) or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # not dataclass's generated signature
        out = {"description": doc.split("\n\n")[0].replace("\n", " "), **out}
    if required:
        out["required"] = required
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(_plain(value))
    except (TypeError, ValueError):
        return False
    return True


def backend_schema(kind: str) -> Schema:
    try:
        config = backend_class(kind).Config
    except ImportError:  # an optional extra that is not installed: its kind is still named
        return {"type": "object", "properties": {"kind": {"const": kind}}, "required": ["kind"]}
    body = object_schema(config)
    body["properties"] = {"kind": {"const": kind}, **body["properties"]}
    body["required"] = ["kind", *body.get("required", [])]
    return body


def config_schema() -> Schema:
    """The whole config file's schema (JSON Schema 2020-12)."""
    policies = {"enum": sorted(POLICY_KINDS)}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "memgate gateway config",
        "description": "Generated by `gateway config-schema` from the config types; do not edit.",
        "type": "object",
        "additionalProperties": False,
        "required": ["backends"],
        "properties": {
            "server": object_schema(ServerConfig),
            "backends": {
                "description": "Backends by name; `kind` picks the fields.",
                "type": "object", "minProperties": 1,
                "additionalProperties": {"oneOf": [backend_schema(k) for k in sorted(BACKEND_KINDS)]},
            },
            "models": {"type": "array", "items": object_schema(ModelConfig)},
            "tenants": {"type": "array", "items": object_schema(TenantConfig)},
            "policies": {"description": "The policy chain, in order.",
                         "anyOf": [{"type": "array", "items": policies}, policies]},
            "policy_options": {
                "description": "Each policy's own options, by policy name.",
                "type": "object", "additionalProperties": False,
                "properties": {n: object_schema(k.Config) for n, k in sorted(POLICY_KINDS.items())},
            },
            "telemetry": object_schema(TelemetryConfig),
            "shared_state": {"anyOf": [object_schema(SharedStateConfig), {"type": "null"}]},
        },
    }


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2, sort_keys=False) + "\n"


# ---------------------------------------------------------------- the reference page


def reference_markdown() -> str:
    """Every key of the config file: path, type, default, what it does."""
    schema = config_schema()
    out = ["# Configuration reference", "",
           "Generated by `gateway config-schema --markdown` from the config types (the same "
           "walk as the JSON Schema, `config.schema.json`); do not edit by hand.", ""]
    for key, sub in schema["properties"].items():
        out += [f"## `{key}`", ""]
        if "description" in sub:
            out += [sub["description"], ""]
        if key == "backends":
            for kind in sub["additionalProperties"]["oneOf"]:
                name = kind["properties"]["kind"]["const"]
                out += [f"### `kind: {name}`", ""]
                out += _table(kind, "backends.<name>")
        elif key == "policy_options":
            for name, body in sub["properties"].items():
                out += [f"### `{name}`", "", *_table(body, f"policy_options.{name}")]
        elif key == "shared_state":
            out += _table(sub["anyOf"][0], key)
        elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
            out += _table(sub["items"], f"{key}[]")
        elif "properties" in sub:
            out += _table(sub, key)
        else:
            out += [f"Type: {_type_name(sub)}.", ""]
    return "\n".join(out).rstrip() + "\n"


def _table(obj: Schema, prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for path, prop in _leaves(obj, prefix):
        default = f"`{_default_text(prop)}`" if "default" in prop else ""
        text = prop.get("description", "").replace("|", "\\|")
        rows.append(f"| `{path}` | {_type_name(prop)} | {default} | {text} |")
    return [*rows, ""]


def _default_text(prop: Schema) -> str:
    value = prop["default"]
    if _type_name(prop).startswith("byte size") and isinstance(value, int) and value:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return json.dumps(value)


def _leaves(obj: Schema, prefix: str) -> list[tuple[str, Schema]]:
    out: list[tuple[str, Schema]] = []
    required = set(obj.get("required", ()))
    for name, prop in obj.get("properties", {}).items():
        path = f"{prefix}.{name}"
        if "properties" in prop and prop.get("type") == "object":
            out += _leaves(prop, path)
            continue
        if name in required:
            prop = {**prop, "description": ("**required.** " + prop.get("description", "")).strip()}
        out.append((path, prop))
    return out


def _type_name(prop: Schema) -> str:
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "anyOf" in prop:
        names = [_type_name(p) for p in prop["anyOf"]]
        if len(names) == 2 and names[0] == f"list of {names[1]}":
            return names[0]  # a one-item list written as its item is not a second type
        if prop["anyOf"][-1].get("pattern") == SIZE_PATTERN:
            return "byte size"
        return " or ".join(dict.fromkeys(names))
    kind = prop.get("type")
    if kind == "array":
        return f"list of {_type_name(prop.get('items', {}))}"
    if kind == "object":
        extra = prop.get("additionalProperties")
        return f"map of {_type_name(extra)}" if isinstance(extra, dict) else "mapping"
    return str(kind) if kind else "any"
