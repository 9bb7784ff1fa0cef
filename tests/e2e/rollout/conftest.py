"""Helpers of the rollout e2e tests: a gateway config with an `openai` primary and an
`openai` candidate, the admin calls, and bounded waits (never for time to pass)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from tests.server import ACME_SHA, GLOBEX_SHA

ADMIN = "sk-rollout-admin"
ENV = {"GATEWAY_ADMIN_KEY": ADMIN}


def remote_config(primary: str, candidate: str, **rollout: Any) -> dict[str, Any]:
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
        "backends": {"primary": {"kind": "openai", "url": primary, "retries": 0},
                     "candidate": {"kind": "openai", "url": candidate, "retries": 0}},
        "models": [{"name": "m", "backend": "primary",
                    "rollout": {"candidate": "candidate", **rollout}}],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["m"]},
                    {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["m"]}],
    }


def sdk(url: str, key: str = "sk-demo-acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def base(url: str) -> str:
    return url.removesuffix("/v1")


def rollout(url: str, model: str = "m") -> dict[str, Any]:
    r = httpx.get(base(url) + "/admin/rollouts", headers={"authorization": f"Bearer {ADMIN}"},
                  timeout=10)
    r.raise_for_status()
    return next(dict(x) for x in r.json()["data"] if x["model"] == model)


def act(url: str, action: str, model: str = "m", key: str = ADMIN) -> httpx.Response:
    return httpx.post(base(url) + f"/admin/rollouts/{model}", json={"action": action},
                      headers={"authorization": f"Bearer {key}"}, timeout=10)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def chat(client: openai.OpenAI, user: str | None = None, model: str = "m",
         **kw: Any) -> tuple[str, str | None]:
    """One request: (its answer, the x-gateway-rollout header)."""
    extra = {"user": user} if user is not None else {}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **extra, **kw)
    return raw.parse().choices[0].message.content or "", raw.headers.get("x-gateway-rollout")
