"""Hypothesis: whatever YAML the config loader is given, it raises ConfigError or nothing."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.settings import ConfigError, load_settings, parse_settings
from tests.server import ACME_SHA

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["64MiB", "9" * 400 + "GiB", "-1", "local", "openai", "demo",
                              "float32", "bogus", ACME_SHA, "0" * 64, "..", "", "1e999"]))
KEYS = st.sampled_from(["server", "backends", "models", "tenants", "policies", "policy_options",
                        "telemetry", "kind", "name", "backend", "model", "url", "port",
                        "max_body_bytes", "kv_cache_bytes", "limits", "adapters", "trim",
                        "api_key_sha256", "api_keys_env", "degrade_to", "priority",
                        "shutdown_grace_s", "body_timeout_s"]) | st.text(max_size=8)
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25)

VALID: dict[str, Any] = {
    "server": {"port": 8000, "max_body_bytes": "1MiB", "shutdown_grace_s": 5},
    "backends": {"up": {"kind": "openai", "url": "http://127.0.0.1:9/v1"},
                 "local": {"kind": "local", "model": "/nonexistent", "kv_cache_bytes": "8MiB"}},
    "models": [{"name": "demo", "backend": "up", "degrade_to": "small"},
               {"name": "small", "backend": "local"}],
    "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["demo", "small"],
                 "adapters": {"demo": "a"}, "limits": {"requests_per_minute": 5,
                                                       "max_kv_share": 0.5},
                 "trim": {"strategy": "middle_out"}}],
    "policies": ["adapter_selection", "admission"],
    "policy_options": {"admission": {"queue_timeout_s": 1}},
    "telemetry": {"service_name": "gw"},
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID)[1:]


def _only_config_errors(data: Any) -> None:
    # anything but ConfigError (TypeError, KeyError, OverflowError, ...) fails the test
    with contextlib.suppress(ConfigError):
        parse_settings(data, "fuzz.yaml")


def test_valid_base_config_loads() -> None:
    assert parse_settings(copy.deepcopy(VALID)).server.shutdown_grace_s == 5


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(JSONISH)
def test_random_structures_raise_only_config_errors(data: Any) -> None:
    _only_config_errors(data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSONISH), min_size=1, max_size=3))
def test_mutated_valid_config_raises_only_config_errors(edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    data = copy.deepcopy(VALID)
    for path, value in edits:
        node: Any = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced this branch
    _only_config_errors(data)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=200) | JSONISH.map(lambda d: yaml.safe_dump(d)))
def test_random_yaml_text_raises_only_config_errors(tmp_path_factory: Any, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "gateway.yaml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        load_settings(path)
