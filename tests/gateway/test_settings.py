from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import ConfigError, load_settings, parse_bytes, parse_settings
from tests.server import ACME_SHA

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict[str, Any]:
    return {
        "backends": {"up": {"kind": "openai", "url": "http://127.0.0.1:9/v1"}},
        "models": [{"name": "m", "backend": "up"}],
        "tenants": [{"name": "t", "api_key_sha256": [ACME_SHA], "models": ["m"]}],
    }


def test_demo_config_loads() -> None:
    s = load_settings(ROOT / "examples" / "demo.yaml")
    assert [m.name for m in s.models] == ["demo"]
    assert {t.name: t.adapters for t in s.tenants} == {
        "acme": {"demo": "acme-support"}, "globex": {"demo": "globex-legal"}}
    local = s.backends["local"]
    assert local.kind == "local"
    assert local.config.kv_cache_bytes == 64 * 2**20
    assert Path(local.config.model) == (ROOT / "models" / "demo").resolve()


def test_operations_example_loads_and_its_keys_files_hold_the_demo_keys() -> None:
    from gateway.tenants import TenantDirectory

    s = load_settings(ROOT / "examples" / "operations.yaml")
    assert s.server.reload == "watch" and s.server.log_format == "json"
    assert s.server.usage_log == str(ROOT / "build" / "usage" / "usage.jsonl")
    tenants = TenantDirectory(s.tenants)
    assert tenants.authenticate("Bearer sk-demo-acme").name == "acme"
    assert tenants.authenticate("Bearer sk-demo-globex").name == "globex"
    assert s.models[0].price is not None and s.models[0].price.cost(10**6, 0) == 0.10


@pytest.mark.parametrize(
    ("value", "expected"),
    [("256MiB", 256 * 2**20), ("1GB", 10**9), (4096, 4096), ("1.5KiB", 1536), ("12 B", 12)],
)
def test_parse_bytes(value: object, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", -1, True, "5 parsecs"])
def test_parse_bytes_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(value)


def test_fidelity_keys_parse() -> None:
    data = _base()
    data["server"] = {"cors_origins": ["https://app.example"]}
    data["backends"]["up"].update(responses_api="via_chat", drop_fields=["verbosity"])
    data["tenants"][0]["limits"] = {"max_output_tokens": 4096}
    s = parse_settings(data)
    assert s.server.cors_origins == ("https://app.example",)
    assert s.tenants[0].limits.max_output_tokens == 4096


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.update(sever={}), "sever: unknown field"),
        (lambda d: d["models"][0].update(backnd="x"), "models[0].backnd: unknown field"),
        (lambda d: d["backends"]["up"].update(timeout=3), "backends.up.timeout: unknown field"),
        (lambda d: d["backends"]["up"].update(kind="nope"), "backends.up.kind: unknown backend kind 'nope'"),
        (lambda d: d["backends"]["up"].pop("url"), "backends.up.url: required field is missing"),
        (lambda d: d["tenants"][0].update(models=["x"]), "tenants[0].models[0]: no model named 'x'"),
        (lambda d: d["tenants"][0].update(priority="urgent"), "tenants[0].priority"),
        (lambda d: d["tenants"][0].update(api_key_sha256=["abc"]), "tenants[0].api_key_sha256[0]"),
        (lambda d: d["tenants"][0].update(limits={"max_concurency": 3}),
         "tenants[0].limits.max_concurency: unknown field"),
        (lambda d: d.update(server={"port": "eighty"}), "server.port: expected an integer"),
        (lambda d: d.update(server={"max_body_bytes": "huge"}), "server.max_body_bytes"),
        (lambda d: d["models"][0].update(degrade_to="small"), "models[0].degrade_to: no model named"),
        (lambda d: d.update(server={"default_max_tokens": 256}),
         "server.default_max_tokens: removed (it capped answers silently)"),
        (lambda d: d["tenants"][0].update(limits={"max_output_tokens": 0}),
         "limits.max_output_tokens must be at least 1"),
        (lambda d: d["backends"]["up"].update(responses_api="sometimes"),
         "responses_api must be one of native, via_chat"),
        (lambda d: d["backends"]["up"].update(drop_fields=["model"]), "drop_fields cannot drop"),
    ],
)
def test_mistakes_name_the_field(mutate: Any, path: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_settings(data, "cfg.yaml")
    assert str(info.value).startswith("cfg.yaml: ")
    assert path in str(info.value)


def test_serve_refuses_bad_config_with_file_and_path(tmp_path: Path) -> None:
    data = _base()
    data["tenants"][0]["modles"] = ["m"]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr
    assert "tenants[0].modles: unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_yaml_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(cfg)


@pytest.mark.parametrize("threads", ["auto", 1, 4])
def test_torch_threads_auto_or_positive(threads: object) -> None:
    data = _base()
    data["server"] = {"torch_threads": threads}
    assert parse_settings(data).server.torch_threads == threads


@pytest.mark.parametrize("threads", [0, -2, "two", True, 1.5])
def test_torch_threads_rejects(threads: object) -> None:
    data = _base()
    data["server"] = {"torch_threads": threads}
    with pytest.raises(ConfigError, match=r"server\.torch_threads.*'auto'"):
        parse_settings(data, "cfg.yaml")
