"""A real `gateway serve` in front of the hostile upstream (tests/e2e/hostile_upstream.py):
two tenants on one `openai` backend, short timeouts, a small pool (so connections are reused
and a confused client would carry one request's bytes into the next)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.hostile_upstream import HostileUpstream
from tests.server import ACME_SHA, GLOBEX_SHA, running_gateway

ENV = {"GATEWAY_ADMIN_KEY": "sk-admin"}


def hostile_config(upstream: str, **backend: Any) -> dict[str, Any]:
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY", "header_timeout_s": 1.5,
                   "keep_alive_timeout_s": 2},
        "backends": {"up": {"kind": "openai", "url": upstream, "read_timeout": 3,
                            "max_connections": 4, "cooldown_s": 0.05,
                            "max_response_bytes": "16MiB", **backend}},
        "models": [{"name": "up", "backend": "up"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["up"]},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["up"]},
        ],
    }


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream().running() as up:
        yield up


@pytest.fixture(scope="module")
def hostile_gateway(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(hostile_config(hostile.url), tmp_path_factory.mktemp("hostile"),
                         env=ENV) as url:
        yield url


def sdk(url: str, key: str = "sk-demo-acme") -> openai.OpenAI:
    """The official client, without its own retries (a retry would hide a resend)."""
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def ask(url: str, mode: str, marker: str, *, stream: bool = False,
        key: str = "sk-demo-acme") -> str:
    """The answer's text through the gateway (raises the SDK's error for an error answer)."""
    messages: Any = [{"role": "user", "content": f"{mode} {marker}"}]
    client = sdk(url, key)
    if not stream:
        reply = client.chat.completions.create(model="up", messages=messages)
        return reply.choices[0].message.content or ""
    parts = client.chat.completions.create(model="up", messages=messages, stream=True)
    return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)


def back_in_rotation(url: str) -> None:
    """After an upstream failure the backend is out of rotation for cooldown_s: wait until a
    plain request is served again (bounded; the count of plain requests is not asserted)."""
    for i in range(200):
        try:
            ask(url, "plain", f"probe-{i}")
            return
        except openai.APIStatusError as exc:
            if exc.status_code != 503:
                raise
        time.sleep(0.05)
    raise AssertionError("the upstream did not come back into rotation")


def held(url: str) -> dict[str, Any]:
    """What the gateway still holds: requests in flight and reservations (/debug/memory)."""
    import httpx

    r = httpx.get(url.removesuffix("/v1") + "/debug/memory",
                  headers={"authorization": "Bearer sk-admin"}, timeout=10)
    r.raise_for_status()
    report = r.json()
    return {"requests": report["requests"], "tenants": report["tenants"],
            "reserved_bytes": report["reservations"]["reserved_bytes"]}


NOTHING_HELD = {"requests": [], "tenants": {}, "reserved_bytes": 0}


def log_tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""
