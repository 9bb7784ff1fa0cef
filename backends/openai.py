"""`openai` backend kind: any OpenAI-compatible upstream over httpx, streamed through."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.base import BackendStats, Capacity, MemorySnapshot
from gateway.context import Chunk, RequestContext, Usage
from gateway.errors import BackendError


@dataclass(frozen=True)
class OpenAIConfig:
    url: str  # base URL including the version prefix, e.g. http://127.0.0.1:8001/v1
    api_key_env: str | None = None  # name of the env variable holding the upstream key
    model: str | None = None  # upstream model name; default: the public model name
    adapters_as_models: bool = False  # send the tenant's adapter as the model (vLLM LoRA style)
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    max_connections: int = 256


class OpenAIBackend:
    Config = OpenAIConfig

    def __init__(self, name: str, cfg: OpenAIConfig) -> None:
        self.name = name
        self.cfg = cfg
        self._client: httpx.AsyncClient | None = None
        self._trace_context = TraceContextTextMapPropagator()

    async def start(self) -> None:
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            base_url=self.cfg.url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.cfg.read_timeout, connect=self.cfg.connect_timeout),
            limits=httpx.Limits(max_connections=self.cfg.max_connections,
                                max_keepalive_connections=self.cfg.max_connections),
        )

    def _body(self, ctx: RequestContext) -> dict[str, Any]:
        s = ctx.sampling
        model = self.cfg.model or ctx.target_model
        if self.cfg.adapters_as_models and ctx.adapter:
            model = ctx.adapter
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = s.stop
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.ignore_eos:
            body["ignore_eos"] = True
        if ctx.kind == "chat":
            body["messages"] = ctx.messages
        else:
            body["prompt"] = ctx.prompt
        return body

    async def generate(self, ctx: RequestContext) -> AsyncIterator[Chunk]:
        if self._client is None:
            raise BackendError(f"backend {self.name} is not started", status=503)
        path = "/chat/completions" if ctx.kind == "chat" else "/completions"
        headers = {"x-request-id": ctx.request_id}
        self._trace_context.inject(headers)  # W3C traceparent of the current (request) span
        try:
            async with self._client.stream("POST", path, json=self._body(ctx), headers=headers) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _upstream_error(resp)
                usage: Usage | None = None
                finish: str | None = None
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        yield Chunk(finish_reason=finish or "stop", usage=usage)
                        return
                    event = _parse_event(data)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                    for choice in event.get("choices") or []:
                        text = choice.get("text") if ctx.kind != "chat" else (choice.get("delta") or {}).get("content")
                        if text:
                            yield Chunk(text=text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                raise BackendError(f"upstream {self.name} ended the stream early", status=502,
                                   code="upstream_incomplete")
        except httpx.TimeoutException:
            raise BackendError(f"upstream {self.name} timed out", status=504, code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            raise BackendError(f"upstream {self.name} is unreachable ({type(exc).__name__})",
                               status=502, code="upstream_unreachable") from None

    def count_tokens(self, ctx: RequestContext) -> int | None:
        return None

    def capacity(self) -> Capacity | None:
        return None

    def adapters(self) -> dict[str, int] | None:
        return None  # the upstream decides; adapter names pass through unchecked

    def memory(self) -> MemorySnapshot:
        return MemorySnapshot()

    def stats(self) -> BackendStats:
        return BackendStats()

    async def ensure_adapter(self, name: str) -> None:
        return None

    async def health(self) -> bool:
        if self._client is None:
            return False
        try:
            resp = await self._client.get("/models", timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code < 500

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _parse_event(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise BackendError("upstream sent malformed JSON in its stream", code="upstream_malformed") from None
    if not isinstance(event, dict):
        raise BackendError("upstream sent an unexpected stream event", code="upstream_malformed")
    if isinstance(event.get("error"), dict):
        message = str(event["error"].get("message") or "upstream error")
        raise BackendError(f"upstream error: {message}", status=502, code="upstream_error")
    return event


def _upstream_error(resp: httpx.Response) -> BackendError:
    message = f"upstream answered {resp.status_code}"
    try:
        err = resp.json().get("error", {})
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
    except ValueError:
        pass
    # Client mistakes pass through with their status; upstream failures become 502.
    status = resp.status_code if resp.status_code in (400, 404, 413, 422, 429) else 502
    return BackendError(message, status=status, code="upstream_error")
