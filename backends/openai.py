"""`openai` backend kind: any OpenAI-compatible upstream, streamed through.

Reliability, all before the first byte only (once a token went out, a failure is the
client's error event, never a silent replay):
- retries: a connect error, or a 502/503/504 answered before any byte, is retried up to
  `retries` times with a small exponential backoff (the request is idempotent until then);
- rotation: a connect error or a 5xx takes the upstream out of rotation (`available()` is
  False) for `cooldown_s`; a background probe (GET /models every cooldown_s) puts it back.
  While out of rotation `generate` fails at once with 503, so the pipeline falls back to
  the model's degrade_to tier and routing skips the replica.
- `adapter_model`: how a tenant adapter is named upstream, a format over {model} and
  {adapter}: "{model}:{adapter}" for another memgate gateway, "{adapter}" for vLLM.

Faithful: the client's body goes upstream as sent, changed only where the gateway must (the
model name; stream_options.include_usage when it needs the usage of a stream; the tenant's
max_output_tokens where the request named no limit; the messages context_trim kept), and
the upstream's answer comes back as it sent it (each SSE event, or the JSON answer, as a
Chunk.event). `drop_fields` (config) lists fields an upstream rejects: removed, by choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from backends.merge import merge
from backends.remote import RemoteBackend, adapter_name
from backends.sse_reader import EventReader
from backends.upstream_call import UpstreamCall, server_of
from backends.upstream_http import MAX_RESPONSE_BYTES, Upstream, UpstreamHTTP, UpstreamResponse
from backends.upstream_proxy import Proxy, proxy_for
from backends.wire import SSEState, has_output, parse_event, upstream_body, upstream_error, usage_of
from gateway.core.backend import BackendStats
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import BackendError

log = logging.getLogger(__name__)

RETRYABLE_STATUS = (502, 503, 504)
PATHS = {"chat": "/chat/completions", "completion": "/completions", "responses": "/responses",
         "embeddings": "/embeddings"}
RESPONSES_API = ("native", "via_chat")


@dataclass(frozen=True)
class OpenAIConfig:
    url: str  # base URL including the version prefix, e.g. http://127.0.0.1:8001/v1
    api_key_env: str | None = None  # name of the env variable holding the upstream key
    model: str | None = None  # upstream model name; default: the public model name
    adapter_model: str | None = None  # upstream name for model + adapter: "{model}:{adapter}"
    connect_timeout: float = 5.0
    read_timeout: float = 300.0
    max_connections: int = 256
    retries: int = 2  # extra tries of a connect error / 502 / 503 / 504 before any byte
    retry_backoff_s: float = 0.05  # first backoff; doubles with each retry
    cooldown_s: float = 5.0  # out of rotation this long after a failure, then re-probed
    trust_env: bool = True  # HTTP(S)_PROXY / NO_PROXY, for every client (backends/upstream_proxy.py)
    max_response_bytes: int = MAX_RESPONSE_BYTES  # a larger upstream answer is a 502
    # -- fidelity
    responses_api: str = "native"  # native: /v1/responses passes through | via_chat: over chat
    drop_fields: tuple[str, ...] = ()  # request fields this upstream rejects (removed; a choice)
    # -- end fidelity
    # The upstream is a Kubernetes Gateway API Inference Extension's gateway: send the tenant
    # as x-gateway-inference-fairness-id and its inference_objective as
    # x-gateway-inference-objective (tenant policy here, endpoint picking there)
    inference_extension: bool = False

    def __post_init__(self) -> None:
        if self.responses_api not in RESPONSES_API:
            raise ValueError(f"responses_api must be one of {', '.join(RESPONSES_API)}")
        if "model" in self.drop_fields or "messages" in self.drop_fields:
            raise ValueError("drop_fields cannot drop model or messages")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.cooldown_s <= 0:
            raise ValueError("retries and retry_backoff_s must be >= 0, cooldown_s > 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.adapter_model is not None:
            adapter_name(self.adapter_model, "m", "a")
        if self.max_response_bytes < 1:
            raise ValueError("max_response_bytes must be >= 1")
        proxy_for(self.url, self.trust_env)  # an unsupported proxy is refused here


class OpenAIBackend(RemoteBackend):
    Config = OpenAIConfig
    provider = "openai"  # gen_ai.provider.name of its client spans

    def __init__(self, name: str, cfg: OpenAIConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.server = server_of(cfg.url)  # server.address, server.port of its client spans
        self._client: httpx.AsyncClient | None = None  # control plane: health, admin calls
        self._http: Upstream | None = None  # generation: the hot path (backends/upstream_http.py)
        self._down_since: float | None = None  # out of rotation since (monotonic)
        self._probe: asyncio.Task[None] | None = None
        self.proxy: Proxy | None = None
        self.failures = 0  # upstream failures seen (connect errors, 5xx)
        self.retried = 0  # retries made

    async def start(self) -> None:
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        # One proxy decision and one TLS trust for both clients (the environment is read here,
        # once: httpx's own trust_env stays off so that it cannot decide differently).
        self.proxy = proxy_for(self.cfg.url, self.cfg.trust_env)
        tls = ssl.create_default_context()
        self._client = httpx.AsyncClient(
            base_url=self.cfg.url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.cfg.read_timeout, connect=self.cfg.connect_timeout),
            limits=httpx.Limits(max_connections=self.cfg.max_connections,
                                max_keepalive_connections=self.cfg.max_connections),
            proxy=self.proxy.url if self.proxy is not None else None,
            trust_env=False,
            verify=tls,
        )
        self._http = UpstreamHTTP(self.cfg.url, headers, self.cfg.connect_timeout,
                                  self.cfg.read_timeout, self.cfg.max_connections,
                                  proxy=self.proxy, max_response_bytes=self.cfg.max_response_bytes,
                                  ssl_context=tls)

    # ---- rotation --------------------------------------------------------------------------

    def available(self) -> bool:
        """False while out of rotation after a failure (until a probe succeeds)."""
        return self._down_since is None

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self._down_since is not None:
            return
        log.warning("upstream %s out of rotation for %.1f s: %s", self.name, self.cfg.cooldown_s, why)
        self._down_since = time.monotonic()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reprobe())

    async def _reprobe(self) -> None:
        while self._down_since is not None:
            await asyncio.sleep(self.cfg.cooldown_s)
            if await self.health():
                log.info("upstream %s back in rotation", self.name)
                self._down_since = None

    # ---- requests --------------------------------------------------------------------------

    def upstream_model(self, ctx: RequestContext) -> str:
        model = self.cfg.model or ctx.target_model
        if self.cfg.adapter_model and ctx.adapter:
            return adapter_name(self.cfg.adapter_model, model, ctx.adapter)
        return model

    def forwards(self, kind: str) -> bool:
        """Responses go upstream as sent with responses_api native, else over chat."""
        return kind != "responses" or self.cfg.responses_api == "native"

    def _body(self, ctx: RequestContext) -> dict[str, Any]:
        """The client's body, changed only where the gateway must (see the module doc)."""
        body = upstream_body(ctx, self.upstream_model(ctx))
        for name in self.cfg.drop_fields:
            body.pop(name, None)
        return body

    async def _open(self, client: Upstream, ctx: RequestContext
                    ) -> tuple[UpstreamResponse, UpstreamCall]:
        """Send the request and return the streaming response with a status < 400 (and the
        client span of the try that got it), retrying what was never sent (connect errors)
        and 502/503/504 answers (the upstream said it did not serve it). A request the
        upstream may have received and then dropped is not sent again
        (httpx.RemoteProtocolError from the pool). Each try is its own client span."""
        path = PATHS[ctx.kind]
        payload = self._body(ctx)
        body = orjson.dumps(payload)
        extra: dict[str, str] = {}
        if self.cfg.inference_extension:
            extra["x-gateway-inference-fairness-id"] = ctx.tenant
            if ctx.inference_objective:
                extra["x-gateway-inference-objective"] = ctx.inference_objective
        for attempt in range(self.cfg.retries + 1):
            last = attempt == self.cfg.retries
            if attempt:
                self.retried += 1
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            call = UpstreamCall.start(ctx, self.provider, payload["model"], self.server, attempt)
            headers = {"x-request-id": ctx.request_id, **extra, **call.headers(ctx)}
            try:
                resp = await client.request("POST", path, body, headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                call.failed(type(exc).__name__)
                if last:
                    raise
                continue
            except BaseException as exc:
                call.failed(type(exc).__name__)
                raise
            call.answered(resp.status_code)
            if resp.status_code < 400:
                return resp, call
            call.failed(str(resp.status_code))
            await resp.aread()
            await resp.aclose()
            if resp.status_code in RETRYABLE_STATUS and not last:
                continue
            if resp.status_code >= 500:
                self._failed(f"answered {resp.status_code}")
            raise upstream_error(resp)
        raise BackendError(f"upstream {self.name} failed", status=502)  # not reached

    async def generate(self, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        client = self._http
        if client is None:
            raise BackendError(f"backend {self.name} is not started", status=503)
        if not self.available():
            err = BackendError(f"upstream {self.name} is out of rotation after failures",
                               status=503, code="upstream_unavailable")
            err.retry_after = self.cfg.cooldown_s
            raise err
        try:
            resp, call = await self._open(client, ctx)
            last: Chunk | None = None
            try:
                if resp.is_json():  # asked without stream
                    last = self._whole(await resp.aread(), ctx)
                    yield last
                elif ctx.stream:
                    async for last in self._chunks(resp, ctx):
                        yield last
                else:  # an upstream that streamed an answer asked whole: the whole answer
                    last = await self._merged(resp, ctx)
                    yield last
            except BaseException as exc:
                cut = isinstance(exc, GeneratorExit | asyncio.CancelledError)
                # closed after its last chunk (the pipeline's way to end) is no failure
                if not (cut and last is not None and last.finish_reason is not None):
                    call.failed("cancelled" if cut else type(exc).__name__)
                raise
            finally:
                await resp.aclose()
                call.finished(last.usage if last else None, last.finish_reason if last else None)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                self._failed("connect timeout")
            raise BackendError(f"upstream {self.name} timed out", status=504, code="upstream_timeout") from None
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TransportError):
                self._failed(type(exc).__name__)
            if isinstance(exc, httpx.ConnectError):
                raise BackendError(f"upstream {self.name} is unreachable", status=502,
                                   code="upstream_unreachable") from None
            # the pool's own messages: what went wrong, never a key or a body
            raise BackendError(f"upstream {self.name} failed: {exc}", status=502,
                               code="upstream_error") from None

    async def _merged(self, resp: UpstreamResponse, ctx: RequestContext) -> Chunk:
        events: list[dict[str, Any]] = []
        last = Chunk(finish_reason="stop")
        async for chunk in self._chunks(resp, ctx):
            if chunk.event is not None:
                events.append(chunk.event)
            else:
                last = chunk
        if ctx.kind not in ("chat", "completion"):
            raise BackendError(f"upstream {self.name} streamed a {ctx.kind} answer asked whole",
                               status=502, code="upstream_malformed")
        last.event = merge(events, ctx.kind == "chat")
        return last

    async def _chunks(self, resp: UpstreamResponse, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        """The upstream's SSE as chunks. Read a block at a time (whatever arrived), so that
        the chunks of one block go out together (Chunk.more) in one write to the client.
        Events before the first that carries output (the role, `response.created`) are held
        until it comes: a failure before it is still one the pipeline can fall back from."""
        state = SSEState()
        events = EventReader()
        held: list[Chunk] | None = []  # None once output began
        async for block in resp.blocks():
            out = state.feed(events.feed(block))
            if held is not None:
                held += out
                if not any(c.event is None or has_output(c.event) for c in held):
                    if state.error is not None:
                        raise state.error
                    continue
                out, held = held, None
            for i, chunk in enumerate(out):
                chunk.more = i < len(out) - 1 or state.done  # after [DONE]: the end
                yield chunk
            if state.error is not None:
                raise state.error
            if state.done:
                resp.expect_end()  # the body's end may still be on its way: keep the connection
                return
        for chunk in (held or []) + state.feed(events.close()):  # and an unfinished last event
            yield chunk
        if state.error is not None:
            raise state.error
        if not state.done and state.finish is not None:  # ended after its finish, without [DONE]
            yield state.end()
        elif not state.done:
            raise BackendError(f"upstream {self.name} ended the stream early", status=502,
                               code="upstream_incomplete")

    def _whole(self, data: bytes, ctx: RequestContext) -> Chunk:
        """A JSON answer as one chunk that carries it whole (and its finish_reason and usage
        for the gateway's accounting)."""
        answer = parse_event(data)
        if ctx.kind in ("chat", "completion"):
            choices = answer.get("choices")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise BackendError(f"upstream {self.name} answered without choices", status=502,
                                   code="upstream_malformed")
            finish = choices[0].get("finish_reason") or "stop"
        else:
            finish = "length" if answer.get("status") == "incomplete" else "stop"
        return Chunk(finish_reason=str(finish), usage=usage_of(answer), event=answer)

    def stats(self) -> BackendStats:
        """Retries made and failures seen (the circuit's state is available())."""
        return BackendStats(upstream_retries=self.retried, upstream_failures=self.failures)

    async def health(self) -> bool:
        if self._client is None:
            return False
        try:
            resp = await self._client.get("/models", timeout=2.0)
        except httpx.HTTPError:
            return False
        return resp.status_code < 500

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        client, self._client = self._client, None  # a health() check from now on says False
        if client is not None:
            await client.aclose()
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()
