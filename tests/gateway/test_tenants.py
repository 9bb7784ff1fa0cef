from __future__ import annotations

import hashlib

import pytest

from gateway.core.config import TenantConfig
from gateway.core.errors import AuthenticationFailed
from gateway.tenants import TenantDirectory


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_from_hashes_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B_KEYS", "sk-b1, sk-b2")
    d = TenantDirectory((
        TenantConfig(name="a", api_key_sha256=(_sha("sk-a"),)),
        TenantConfig(name="b", api_keys_env="B_KEYS"),
    ))
    assert d.authenticate("Bearer sk-a").name == "a"
    assert d.authenticate("Bearer sk-b1").name == "b"
    assert d.authenticate("bearer sk-b2").name == "b"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic sk-a", "Bearer sk-wrong", "sk-a"])
def test_rejections_never_echo_the_key(header: str | None) -> None:
    d = TenantDirectory((TenantConfig(name="a", api_key_sha256=(_sha("sk-a"),)),))
    with pytest.raises(AuthenticationFailed) as info:
        d.authenticate(header)
    assert info.value.status == 401
    assert "sk-" not in info.value.message
