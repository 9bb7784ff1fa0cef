"""A plain-Python backend and settings builder for policy unit tests (no torch, no HTTP)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from gateway.core.backend import Capacity
from gateway.core.context import RequestContext, SamplingParams
from gateway.core.kv import Lanes
from gateway.settings import Settings, parse_settings
from policies.chain import PolicyEnv
from policies.reservations import Reservations
from policies.routing import Router

SHA = "0" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    """Tokens = words of every message + 2 per message (a stand-in for a chat template)."""

    def __init__(self, name: str, kv_bytes: int | None = 64 * 2048 * 16, window: int = 256,
                 adapters: dict[str, int] | None = None, resident: tuple[str, ...] = (),
                 lanes: Lanes | None = None) -> None:
        self.name = name
        self.lanes = lanes
        self.kv_bytes = kv_bytes
        self.window = window
        self._adapters = adapters
        self.resident = list(resident)
        self.counted = 0

    def count_tokens(self, ctx: RequestContext) -> int | None:
        self.counted += 1
        if ctx.messages is None:
            return len((ctx.prompt or "").split())
        return sum(len(str(m["content"]).split()) + 2 for m in ctx.messages)

    def capacity(self) -> Capacity | None:
        if self.kv_bytes is None:
            return None
        return Capacity(kv_bytes_total=self.kv_bytes, kv_bytes_free=self.kv_bytes,
                        bytes_per_token=2048, block_size=16, context_window=self.window,
                        resident_adapters=self.resident, lanes=self.lanes)

    def available(self) -> bool:
        return True

    def adapters(self) -> dict[str, int] | None:
        return self._adapters


def settings(tenants: list[dict[str, Any]] | None = None, **top: Any) -> Settings:
    data: dict[str, Any] = {
        "backends": {"big": {"kind": "openai", "url": "http://x"},
                     "small": {"kind": "openai", "url": "http://y"}},
        "models": [{"name": "large", "backend": "big", "degrade_to": "tiny"},
                   {"name": "tiny", "backend": "small"}],
        "tenants": [{"api_key_sha256": [SHA], "models": ["large", "tiny"], **t}
                    for t in (tenants or [{"name": "acme"}])],
        **top,
    }
    return parse_settings(data)


def env(s: Settings, backends: dict[str, Any] | None = None,
        clock: FakeClock | None = None) -> PolicyEnv:
    clock = clock or FakeClock()
    backends = backends or {"big": FakeBackend("big"), "small": FakeBackend("small")}
    return PolicyEnv(models={m.name: m for m in s.models}, tenants={t.name: t for t in s.tenants},
                     backends=backends, reservations=Reservations(clock, 30.0), router=Router(), clock=clock)


P = TypeVar("P")


def make(kind: Callable[[PolicyEnv, Any], P], s: Settings, backends: dict[str, Any] | None = None,
         clock: FakeClock | None = None) -> P:
    """One policy of kind `kind` with the options `s` gives it, over env(s, backends, clock)."""
    name: str = kind.name
    options = s.policy_options.get(name) or kind.Config()
    return kind(env(s, backends, clock), options)


def ctx(tenant: str = "acme", words: int = 10, max_tokens: int = 16, model: str = "large",
        messages: list[dict[str, Any]] | None = None, adapter: str | None = None) -> RequestContext:
    backend = {"large": "big", "tiny": "small"}[model]
    return RequestContext(
        request_id="r", tenant=tenant, kind="chat", requested_model=model, target_model=model,
        backend=backend, sampling=SamplingParams(max_tokens=max_tokens),
        messages=messages if messages is not None else [{"role": "user", "content": "w " * words}],
        requested_adapter=adapter,
    )
