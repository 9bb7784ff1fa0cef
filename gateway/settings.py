"""YAML config -> frozen, typed settings. Every mistake names its field path and the file."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from backends.registry import backend_class
from gateway.core.config import KeyFileError, ModelConfig, TenantConfig, degrade_chain
from policies.redis_quotas import SharedStateConfig
from policies.registry import DEFAULT_POLICIES, POLICY_KINDS


class ConfigError(Exception):
    """The config file is wrong; the message names the file and the field path."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: object) -> int:
    """256MiB, 1GB, 4096 -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a byte size such as 256MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a byte size cannot be negative")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        size = float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]
        if not size < 2**63:
            raise ValueError(f"byte size {value!r} is too large")
        return int(size)
    raise ValueError(f"expected a byte size such as 256MiB, got {value!r}")


RELOAD_MODES = ("signal", "watch")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class RequestBounds:
    """`server.request_bounds`: what one request body may hold, checked on the parsed body
    before the model is resolved or anything costs CPU (gateway/validation.py); over: a 400."""

    max_messages: int = 2048  # chat `messages`, Responses `input` items
    max_nesting: int = 64  # objects and arrays inside one another (the body is level 1)
    max_schema_bytes: int = 64 * 2**10  # every JSON schema of the request, summed, as JSON
    max_stop: int = 16  # `stop` strings (OpenAI takes 4; local engines are sent more)
    max_logit_bias: int = 1024  # `logit_bias` entries

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1")
        if not 8 <= self.max_nesting <= 256:  # a content part is 5 deep; parsers stop ~1,000
            raise ValueError("max_nesting must be between 8 and 256")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 2**20
    admin_api_key_env: str | None = None
    # -- reliability
    body_timeout_s: float = 30.0  # a request body not fully received by then: 408
    header_timeout_s: float = 10.0  # a request head not fully received by then: 408, closed
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections close after this
    shutdown_grace_s: float = 10.0  # SIGTERM: in-flight requests get this long, then end
    metrics_api_key_env: str | None = None  # set: /metrics needs this bearer key
    # -- end reliability
    torch_threads: Literal["auto"] | int = "auto"  # each engine thread's torch threads
    # the tenant-fair pool for large requests' tokenizing, trimming and grammar compiles
    # (gateway/core/cpu.py): "auto" (the cores this process may use, at most 8) or an integer
    cpu_workers: Literal["auto"] | int = "auto"
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); none: off
    request_bounds: RequestBounds = field(default_factory=RequestBounds)  # per-request bounds
    # -- operations: hot reload, logs, usage records
    reload: str = "signal"  # signal: SIGHUP (forwarded to workers) | watch: the files polled
    log_format: str = "text"  # text | json (one JSON object a line)
    usage_log: str | None = None  # JSON lines, one per finished request (a file per worker)
    usage_log_max_bytes: int = 64 * 2**20  # rotate past this size ...
    usage_log_backups: int = 5  # ... keeping this many rotated files (PATH.1 ... PATH.N)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("usage_log", "state_dir")  # relative to the config file
    # -- end operations
    # -- scale-out
    # --workers N: a worker whose unexplained (`other`) memory passes this is drained and
    # replaced (gateway/workers.py); null: never
    recycle_other_bytes: int | None = None
    # -- end scale-out
    # -- rollouts
    # where live state that must survive a restart is kept (rollout stages); Redis instead
    # when shared_state is set
    state_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_timeout_s",
                     "shutdown_grace_s"):
            value = getattr(self, name)
            if not 0 < value < 86400:
                raise ValueError(f"server.{name} must be between 0 and 86400 seconds")
        if not 0 <= self.port <= 65535:
            raise ValueError("server.port must be between 0 and 65535")
        if self.max_body_bytes < 1:
            raise ValueError("server.max_body_bytes must be >= 1")
        threads = self.torch_threads
        if threads != "auto" and (type(threads) is not int or threads < 1):
            raise ValueError("server.torch_threads must be 'auto' or a positive integer")
        workers = self.cpu_workers
        if workers != "auto" and (type(workers) is not int or not 1 <= workers <= 64):
            raise ValueError("server.cpu_workers must be 'auto' or an integer from 1 to 64")
        if self.reload not in RELOAD_MODES:
            raise ValueError(f"server.reload must be one of {', '.join(RELOAD_MODES)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"server.log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.usage_log_max_bytes < 4096 or self.usage_log_backups < 0:
            raise ValueError("server.usage_log_max_bytes must be >= 4096, usage_log_backups >= 0")




@dataclass(frozen=True)
class TelemetryConfig:
    otlp_endpoint: str | None = None
    service_name: str = "gateway"
    otlp_usage_logs: bool = False  # also export usage records as OTLP log records


@dataclass(frozen=True)
class BackendSpec:
    kind: str
    config: object  # the kind's own frozen Config dataclass (its class's `Config`)


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    policies: tuple[str, ...] = ()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    source: str = "<memory>"
    # each configured policy's own Config (policies/*.py), by policy name; defaults if absent
    policy_options: dict[str, object] = field(default_factory=dict)
    digest: str = ""  # sha256 of the config file's bytes (load_settings; the reload version)
    # -- scale-out: limits shared by every gateway process (Redis); None: in-process
    shared_state: SharedStateConfig | None = None

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


# ---------------------------------------------------------------- generic validation


def _convert(tp: Any, value: Any, path: str, fname: str, base: Path) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for member in inner:  # the first member that takes the value
            try:
                return _convert(member, value, path, fname, base)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: expected {' or '.join(_type_word(a) for a in inner)}, "
                          f"got {value!r}")
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, base)
    if tp is int and fname.endswith("_bytes"):
        try:
            return parse_bytes(value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{path}[{i}]", fname, base) for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {
            _convert(args[0], k, f"{path}.{k}", "", base): _convert(args[1], v, f"{path}.{k}", fname, base)
            for k, v in value.items()
        }
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported type {tp!r}")  # a bug in a Config class


def _type_word(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def build(cls: Any, data: Any, path: str, base: Path = Path(".")) -> Any:
    """Instantiate the dataclass `cls` from a mapping, naming any bad field by its path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<top>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(path, str(key))}: unknown field (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_join(path, name)}: required field is missing")
            continue
        value = _convert(hints[name], data[name], _join(path, name), name, base)
        if name in getattr(cls, "PATH_FIELDS", ()) and isinstance(value, str):
            # absolute, but not through symlinks: a Kubernetes ConfigMap or Secret mount swaps
            # its `..data` link, and a reload must read the path as given again
            value = os.path.abspath(base / value) if not Path(value).is_absolute() else value
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or '<top>'}: {exc}") from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---------------------------------------------------------------- the top level


def parse_settings(data: Any, source: str = "<memory>", base: Path = Path(".")) -> Settings:
    try:
        return _parse(data, source, base)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _parse(data: Any, source: str, base: Path) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping")
    known = {"server", "backends", "models", "tenants", "policies", "policy_options", "telemetry",
             "shared_state"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown field (known: {', '.join(sorted(known))})")
    if isinstance(data.get("server"), dict) and "default_max_tokens" in data["server"]:
        raise ConfigError("server.default_max_tokens: removed (it capped answers silently); a "
                          "request without max_tokens now runs to its end. To cap answers, set "
                          "tenants[].limits.max_output_tokens")
    server = build(ServerConfig, data.get("server"), "server", base)
    backends: dict[str, BackendSpec] = {}
    raw_backends = data.get("backends") or {}
    if not isinstance(raw_backends, dict) or not raw_backends:
        raise ConfigError("backends: expected a non-empty mapping of name -> {kind: ...}")
    for name, raw in raw_backends.items():
        path = f"backends.{name}"
        if not isinstance(raw, dict) or "kind" not in raw:
            raise ConfigError(f"{path}.kind: required field is missing")
        body = dict(raw)
        kind = body.pop("kind")
        if not isinstance(kind, str):
            raise ConfigError(f"{path}.kind: expected a string, got {kind!r}")
        try:
            cls = backend_class(kind)
        except KeyError as exc:
            raise ConfigError(f"{path}.kind: {exc.args[0]}") from None
        backends[str(name)] = BackendSpec(kind=kind, config=build(cls.Config, body, path, base))
    models = _list(ModelConfig, data.get("models"), "models", base)
    tenants = _list(TenantConfig, data.get("tenants"), "tenants", base)
    raw_policies = data["policies"] if "policies" in data else list(DEFAULT_POLICIES)
    policies = _convert(tuple[str, ...], raw_policies or [], "policies", "", base)
    _check_policies(policies)
    options = _policy_options(data.get("policy_options"), base)
    telemetry = build(TelemetryConfig, data.get("telemetry"), "telemetry", base)
    settings = Settings(server, backends, models, tenants, policies, telemetry, source, options)
    if data.get("shared_state") is not None:
        shared = build(SharedStateConfig, data["shared_state"], "shared_state", base)
        settings = dataclasses.replace(settings, shared_state=shared)
    _check_references(settings)
    return settings


def _list(cls: Any, raw: Any, path: str, base: Path) -> tuple[Any, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list")
    return tuple(build(cls, item, f"{path}[{i}]", base) for i, item in enumerate(raw))


def _policy_options(raw: Any, base: Path) -> dict[str, object]:
    """`policy_options: {name: {...}}`: each validated as that policy's own Config."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("policy_options: expected a mapping of policy name -> options")
    out: dict[str, object] = {}
    for name, body in raw.items():
        kind = POLICY_KINDS.get(str(name))
        if kind is None:
            known = ", ".join(sorted(POLICY_KINDS))
            raise ConfigError(f"policy_options.{name}: unknown field (known: {known})")
        out[str(name)] = build(kind.Config, body, f"policy_options.{name}", base)
    return out


def _check_policies(names: tuple[str, ...]) -> None:
    for i, name in enumerate(names):
        if name not in POLICY_KINDS:
            known = ", ".join(sorted(POLICY_KINDS))
            raise ConfigError(f"policies[{i}]: unknown policy {name!r} (known: {known})")
        if names.index(name) != i:
            raise ConfigError(f"policies[{i}]: {name!r} is listed twice")


def _check_priced(s: Settings, i: int, t: TenantConfig) -> None:
    """A tenant with a budget may only use priced models: its own and every tier they
    degrade to (a request can be served there)."""
    models = {m.name: m for m in s.models}
    for name in t.models:
        for model in degrade_chain(models, name):
            if model is not None and model.price is None:
                raise ConfigError(f"tenants[{i}].limits.budget: model {model.name!r} has no "
                                  "price; a tenant with a budget may only use priced models")


def _check_references(s: Settings) -> None:
    names = [m.name for m in s.models]
    for i, m in enumerate(s.models):
        if names.count(m.name) > 1:
            raise ConfigError(f"models[{i}].name: duplicate model name {m.name!r}")
        field_name = "backend" if len(m.backends) == 1 else "backends"
        for b in m.backends:
            if b not in s.backends:
                raise ConfigError(f"models[{i}].{field_name}: no backend named {b!r}")
        if m.degrade_to is not None and m.degrade_to not in names:
            raise ConfigError(f"models[{i}].degrade_to: no model named {m.degrade_to!r}")
        if m.rollout is not None:
            if m.rollout.candidate not in s.backends:
                raise ConfigError(f"models[{i}].rollout.candidate: no backend named "
                                  f"{m.rollout.candidate!r}")
            if m.rollout.candidate in m.backends:
                raise ConfigError(f"models[{i}].rollout.candidate: {m.rollout.candidate!r} "
                                  "already serves this model (name another tier's backend)")
    seen: set[str] = set()
    for i, t in enumerate(s.tenants):
        if t.name in seen:
            raise ConfigError(f"tenants[{i}].name: duplicate tenant {t.name!r}")
        seen.add(t.name)
        if t.priority not in ("high", "normal", "low"):
            raise ConfigError(f"tenants[{i}].priority: expected high, normal or low")
        if not t.weight > 0:
            raise ConfigError(f"tenants[{i}].weight: must be > 0")
        if t.limits.budget is not None:
            _check_priced(s, i, t)
            if "admission" not in s.policies:
                raise ConfigError(f"tenants[{i}].limits.budget: budgets are held by the "
                                  "admission policy, which `policies` leaves out")
        for j, h in enumerate(t.api_key_sha256):
            if not re.fullmatch(r"[0-9a-fA-F]{64}", h):
                raise ConfigError(f"tenants[{i}].api_key_sha256[{j}]: expected 64 hex digits")
        if not t.api_key_sha256 and not t.api_keys_env and not t.api_keys_file:
            raise ConfigError(f"tenants[{i}]: give api_keys_env, api_keys_file or api_key_sha256")
        try:
            t.key_hashes()  # reads the keys file: refused here, with the field, if it is bad
        except KeyFileError as exc:
            raise ConfigError(f"tenants[{i}].api_keys_file: {exc}") from None
        for j, model in enumerate(t.models):
            if model not in names:
                raise ConfigError(f"tenants[{i}].models[{j}]: no model named {model!r}")
        for model in t.adapters:
            if model not in t.models:
                raise ConfigError(f"tenants[{i}].adapters.{model}: not one of this tenant's models")
        for model in t.allowed_adapters:
            if model not in t.models:
                raise ConfigError(
                    f"tenants[{i}].allowed_adapters.{model}: not one of this tenant's models")


def load_settings(path: str | Path) -> Settings:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    settings = parse_settings(data, str(p), p.parent.resolve())
    return dataclasses.replace(settings, digest=hashlib.sha256(text.encode()).hexdigest())
