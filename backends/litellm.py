"""`litellm` backend kind (optional extra): a hosted provider through litellm, for overflow.

Install with `pip install -e '.[litellm]'` (litellm pinned exactly; see pyproject). litellm is
imported in start(), never at gateway import, with LITELLM_LOCAL_MODEL_COST_MAP=True so it
reads its bundled cost map instead of fetching one. litellm holds `openai` below 3, so it
runs in its own venv (.venv-litellm, `make litellm-venv`).

`model` is litellm's model string ("openai/gpt-4o-mini", "anthropic/...", or "openai/<name>"
with `api_base` for any OpenAI-compatible server); `adapter_model` names a tenant adapter
("openai/{model}:{adapter}" for a memgate upstream, where {model} is the part after the
provider prefix). Faithful like the openai kind: the client's fields go to litellm as sent
(litellm passes what it does not know to the provider), its answers come back as the JSON
its response objects stand for. Capacity and memory are unknown (the provider's); errors before the first
byte keep litellm's status (>= 500 lets the pipeline fall back).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from backends.remote import RemoteBackend, adapter_name
from backends.wire import upstream_body, usage_of
from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import BackendError


@dataclass(frozen=True)
class LiteLLMConfig:
    model: str  # litellm model string, e.g. "openai/demo"
    api_base: str | None = None
    api_key_env: str | None = None  # name of the env variable holding the provider key
    adapter_model: str | None = None  # e.g. "openai/{model}:{adapter}"
    timeout: float = 300.0
    num_retries: int = 0  # litellm's own retries (the gateway falls back instead)

    def __post_init__(self) -> None:
        if "/" not in self.model:
            raise ValueError("model must be a litellm model string such as openai/gpt-4o-mini")
        if self.adapter_model is not None:
            adapter_name(self.adapter_model, "m", "a")
        if self.timeout <= 0 or self.num_retries < 0:
            raise ValueError("timeout must be > 0 and num_retries >= 0")


class LiteLLMBackend(RemoteBackend):
    Config = LiteLLMConfig

    def __init__(self, name: str, cfg: LiteLLMConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._litellm: Any = None

    async def start(self) -> None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            self._litellm = importlib.import_module("litellm")
        except ImportError as exc:
            raise RuntimeError(
                f"backend {self.name}: the litellm kind needs `pip install -e '.[litellm]'` ({exc})"
            ) from None
        self._litellm.suppress_debug_info = True  # no "Give Feedback" banners in our logs

    def _model(self, ctx: RequestContext) -> str:
        if self.cfg.adapter_model and ctx.adapter:
            base = self.cfg.model.split("/", 1)[1]
            return adapter_name(self.cfg.adapter_model, base, ctx.adapter)
        return self.cfg.model

    def _kwargs(self, ctx: RequestContext) -> dict[str, Any]:
        """The client's body as litellm's arguments (faithful: every field it sent, the model
        renamed, usage asked of a stream, the tenant's output cap where it named no limit),
        then litellm's own controls."""
        kw = upstream_body(ctx, self._model(ctx))
        kw.update({"timeout": self.cfg.timeout, "num_retries": self.cfg.num_retries,
                   "extra_headers": {"x-request-id": ctx.request_id}})
        if self.cfg.api_base:
            kw["api_base"] = self.cfg.api_base
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if key or self.cfg.api_base:
            kw["api_key"] = key or "none"  # a keyless OpenAI-compatible server still needs one
        return kw

    def forwards(self, kind: str) -> bool:
        return kind in ("chat", "completion", "embeddings")  # Responses: over chat

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        if self._litellm is None:
            raise BackendError(f"backend {self.name} is not started", status=503)
        kw = self._kwargs(ctx)
        call = {"chat": self._litellm.acompletion, "completion": self._litellm.atext_completion,
                "embeddings": self._litellm.aembedding}.get(ctx.kind)
        if call is None:
            raise BackendError(f"litellm {self.name} serves no {ctx.kind} requests", status=400,
                               code="unsupported_request")
        try:
            answer = await call(**kw)
            if not ctx.stream:
                event = _dump(answer)
                choices = event.get("choices") or [{}]
                done = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
                yield Chunk(finish_reason=done or "stop", usage=usage_of(event), event=event)
                return
            usage: Usage | None = None
            finish: str | None = None
            async for part in answer:
                event = _dump(part)
                usage = usage_of(event) or usage
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                yield Chunk(event=event)
            yield Chunk(finish_reason=finish or "stop", usage=usage)
        except BackendError:
            raise
        except Exception as exc:
            raise _error(self.name, exc) from None

    async def health(self) -> bool:
        return self._litellm is not None

    async def aclose(self) -> None:
        self._litellm = None


def _dump(obj: Any) -> dict[str, Any]:
    """litellm's response object as the OpenAI JSON it stands for."""
    dump = getattr(obj, "model_dump", None)
    data = dump(exclude_none=False) if callable(dump) else obj
    return data if isinstance(data, dict) else {}


def _error(name: str, exc: Exception) -> BackendError:
    """litellm's exceptions carry the provider's status_code; keep client errors, map the rest."""
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int) or status < 400:
        status = 502
    if status not in (400, 404, 413, 422, 429):
        status = 504 if "timeout" in type(exc).__name__.lower() else 502
    message = str(getattr(exc, "message", "") or exc)[:300]
    return BackendError(f"litellm {name}: {message}", status=status, code="upstream_error")
