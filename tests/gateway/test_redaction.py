"""Keys never reach a usage record (gateway/tenants.py's redact_keys, gateway/usage.py), and a
record is written whatever strings its request carried; another tenant's adapter resolves
like a name that exists nowhere (gateway/routes.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.core.config import ModelConfig, TenantConfig
from gateway.core.context import RequestContext, SamplingParams
from gateway.core.errors import NotFound
from gateway.metrics import RequestObservation
from gateway.routes import resolve_model
from gateway.tenants import AdminKey, TenantDirectory, redact_keys
from gateway.usage import UsageLog, UsageSinks, clean_text, usage_record

KEYS = {"sk-tenant-key-1", "sk-admin-key", "a key with spaces"}


def is_key(value: str) -> bool:
    return value in KEYS


@pytest.mark.parametrize(("text", "want"), [
    ("sk-tenant-key-1", "[redacted]"),
    ("BEARER sk-tenant-key-1", "[redacted]"),
    ("  bearer \t sk-admin-key \n", "[redacted]"),
    ("a key with spaces", "[redacted]"),
    ("my key is sk-tenant-key-1, thanks", "my key is [redacted], thanks"),
    ("Authorization: Bearer sk-admin-key", "Authorization: Bearer [redacted]"),
    ("key=sk-admin-key&x=1", "key=[redacted]&x=1"),
    ('{"api_key":"sk-admin-key"}', '{"api_key":"[redacted]"}'),
    ("sk-admin-key/sk-tenant-key-1", "[redacted]/[redacted]"),
    ("nothing here", "nothing here"),
])
def test_keys_are_redacted_wherever_they_are_a_word(text: str, want: str) -> None:
    assert redact_keys(text, is_key) == want


def test_the_directory_and_the_admin_key_tell_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RED_ADMIN", "sk-admin-key")
    tenant = TenantConfig(name="t", api_key_sha256=(
        hashlib.sha256(b"sk-tenant-key-1").hexdigest(),), models=("m",))
    directory, admin = TenantDirectory((tenant,)), AdminKey("RED_ADMIN")

    def known(v: str) -> bool:
        return directory.is_key(v) or admin.is_key(v)

    assert redact_keys("x BEARER sk-tenant-key-1 y sk-admin-key", known) == (
        "x BEARER [redacted] y [redacted]")
    # the scheme is case-insensitive for both, and strict otherwise
    assert directory.authenticate("BEARER sk-tenant-key-1") is tenant
    admin.authenticate("bearer sk-admin-key")


def ctx(**fields: Any) -> RequestContext:
    return RequestContext(request_id="r", tenant="acme", kind="chat", requested_model="m",
                          target_model="m", backend="b", sampling=SamplingParams(), **fields)


def record(context: RequestContext, request_id: str = "r") -> dict[str, Any]:
    sinks = UsageSinks(None)
    sinks.is_key = is_key
    obs = RequestObservation("acme", "m", "b", "200", 0.1)
    return usage_record(obs, context, request_id, 1, None, sinks)


def test_a_record_redacts_user_metadata_names_and_values_and_the_request_id() -> None:
    rec = record(ctx(user="Bearer sk-tenant-key-1", metadata={
        "sk-admin-key": "a", "sk-tenant-key-1": "b", "note": "token=sk-admin-key"}),
        request_id="sk-admin-key")
    assert rec["user"] == "[redacted]" and rec["request_id"] == "[redacted]"
    assert rec["metadata"] == {"[redacted]": "a", "[redacted]#1": "b",
                               "note": "token=[redacted]"}
    assert not any(k in json.dumps(rec) for k in KEYS)


def test_a_key_is_redacted_before_the_value_is_cut() -> None:
    rec = record(ctx(user="x" * 250 + " sk-tenant-key-1"))
    assert "sk-" not in rec["user"] and rec["user"].startswith("x" * 250)


def test_odd_strings_never_stop_a_record(tmp_path: Path) -> None:
    rec = record(ctx(user="u\ud800", metadata={"k\udc00": "v\udfff"}))
    assert rec["user"] == "u\ufffd" and rec["metadata"] == {"k\ufffd": "v\ufffd"}
    log = UsageLog(tmp_path / "usage.jsonl", 1 << 20, 1)
    log.write(rec)
    log.write({"user": "raw\ud800", "odd": object(), "n": 1 << 70})  # whatever a record holds
    log.flush()
    lines = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and log.written == 2
    assert lines[1]["user"] == "raw\ufffd" and lines[1]["n"] == str(1 << 70)
    assert clean_text("plain") == "plain"


def test_another_tenants_adapter_resolves_like_an_unknown_name() -> None:
    acme = TenantConfig(name="acme", api_key_sha256=("0" * 64,), models=("demo",),
                        adapters={"demo": "acme-support"},
                        allowed_adapters={"demo": ("shared",)})
    settings = SimpleNamespace(model=lambda n: ModelConfig(name="demo", backend="b")
                               if n == "demo" else None)
    state: Any = SimpleNamespace(settings=settings)
    assert resolve_model(state, acme, "demo")[1] is None
    assert resolve_model(state, acme, "demo:acme-support")[1] == "acme-support"
    assert resolve_model(state, acme, "demo:shared")[1] == "shared"
    messages = []
    for name in ("demo:globex-legal", "demo:no-such", "demo:", "other"):
        with pytest.raises(NotFound) as info:
            resolve_model(state, acme, name)
        assert (info.value.status, info.value.code, info.value.param) == (
            404, "model_not_found", "model")
        messages.append(info.value.message.replace(name, "NAME"))
    assert len(set(messages)) == 1
