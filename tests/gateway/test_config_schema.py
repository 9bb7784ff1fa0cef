"""The config's JSON Schema and reference page come from the config types: the committed
copies match `gateway config-schema`, every example config validates against the schema and
loads, and the schema refuses what the loader refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.cli import main
from gateway.config_schema import config_schema, reference_markdown, schema_text
from gateway.settings import ConfigError, parse_settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "config.schema.json"
REFERENCE_FILE = ROOT / "docs" / "reference" / "configuration.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
HOW = "regenerate: gateway config-schema > docs/config.schema.json; " \
      "gateway config-schema --markdown > docs/reference/configuration.md"


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))


def test_the_committed_schema_and_reference_are_what_the_types_generate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert SCHEMA_FILE.read_text() == schema_text(), HOW
    assert REFERENCE_FILE.read_text() == reference_markdown(), HOW
    assert main(["config-schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text()
    jsonschema.Draft202012Validator.check_schema(config_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates_and_loads(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    validator().validate(data)
    parse_settings(data, str(path), path.parent)


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


BASE: dict[str, Any] = {
    "backends": {"b": {"kind": "openai", "url": "http://127.0.0.1:9/v1"}},
    "models": [{"name": "m", "backend": "b"}],
    "tenants": [{"name": "t", "api_key_sha256": ["a" * 64], "models": ["m"]}],
}


def with_change(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    node: Any = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    return data


GOOD = [
    (("server", "max_body_bytes"), "8MiB"),
    (("server", "max_body_bytes"), 1024),
    (("server", "torch_threads"), 2),
    (("server", "torch_threads"), "auto"),
    (("server", "cors_origins"), "http://a.example"),  # one item stands for a list of one
    (("tenants", 0, "limits"), {"max_concurrency": 4}),
    (("policies",), ["routing", "admission"]),
]
BAD = [
    (("server", "max_body_bytes"), "lots"),
    (("server", "torch_threads"), "many"),
    (("server", "torch_threads"), True),
    (("server", "nonsense"), 1),
    (("backends", "b", "kind"), "nope"),
    (("backends", "b", "unknown_field"), 1),
    (("tenants", 0, "limits"), {"max_concurrency": "4"}),
    (("policies",), ["no_such_policy"]),
    (("telemetry",), {"service_name": 3}),
]


@pytest.mark.parametrize(("path", "value"), GOOD, ids=[".".join(map(str, p)) for p, _ in GOOD])
def test_the_schema_and_the_loader_both_accept(path: tuple[Any, ...], value: Any) -> None:
    data = with_change(path, value)
    validator().validate(data)
    parse_settings(data)


@pytest.mark.parametrize(("path", "value"), BAD, ids=[".".join(map(str, p)) for p, _ in BAD])
def test_the_schema_and_the_loader_both_refuse(path: tuple[Any, ...], value: Any) -> None:
    data = with_change(path, value)
    assert not validator().is_valid(data)
    with pytest.raises(ConfigError):
        parse_settings(data)


def test_a_union_names_each_member_when_none_takes_the_value() -> None:
    with pytest.raises(ConfigError, match=r"server.torch_threads: expected 'auto' or an integer"):
        parse_settings(with_change(("server", "torch_threads"), "many"))


def test_field_descriptions_come_from_the_source_comments() -> None:
    server = config_schema()["properties"]["server"]["properties"]
    assert "408" in server["body_timeout_s"]["description"]
    assert server["recycle_other_bytes"]["description"].startswith("--workers N")
    assert "| `server.max_body_bytes` | byte size | `4MiB` |" in reference_markdown()
