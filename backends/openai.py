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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import os
import ssl
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from backends.base import RemoteBackend, adapter_name
from backends.sse_reader import EventReader
from backends.upstream_http import MAX_RESPONSE_BYTES, Upstream, UpstreamHTTP, UpstreamResponse
from backends.upstream_proxy import Proxy, proxy_for
from gateway.core.context import Chunk, RequestContext, Usage
from gateway.core.errors import BackendError

log = logging.getLogger(__name__)

RETRYABLE_STATUS = (502, 503, 504)
PASS_STATUS = (400, 404, 413, 422, 429)  # an upstream's answer the client gets as it is


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
    # The upstream is a Kubernetes Gateway API Inference Extension's gateway: send the tenant
    # as x-gateway-inference-fairness-id and its inference_objective as
    # x-gateway-inference-objective (tenant policy here, endpoint picking there)
    inference_extension: bool = False

    def __post_init__(self) -> None:
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

    def __init__(self, name: str, cfg: OpenAIConfig) -> None:
        self.name = name
        self.cfg = cfg
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

    def _body(self, ctx: RequestContext) -> dict[str, Any]:
        s = ctx.sampling
        body: dict[str, Any] = {
            "model": self.upstream_model(ctx),
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        # A non-streaming client gets the upstream's JSON answer (one body to parse instead
        # of an SSE event per token); a streaming one gets the stream, with usage at its end.
        if ctx.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        else:
            body["stream"] = False
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

    async def _open(self, client: Upstream, ctx: RequestContext) -> UpstreamResponse:
        """Send the request and return the streaming response with a status < 400, retrying
        what was never sent (connect errors) and 502/503/504 answers (the upstream said it did
        not serve it). A request the upstream may have received and then dropped is not sent
        again (httpx.RemoteProtocolError from the pool)."""
        path = "/chat/completions" if ctx.kind == "chat" else "/completions"
        headers = {"x-request-id": ctx.request_id, **ctx.trace_headers}
        if self.cfg.inference_extension:
            headers["x-gateway-inference-fairness-id"] = ctx.tenant
            if ctx.inference_objective:
                headers["x-gateway-inference-objective"] = ctx.inference_objective
        body = orjson.dumps(self._body(ctx))
        for attempt in range(self.cfg.retries + 1):
            last = attempt == self.cfg.retries
            if attempt:
                self.retried += 1
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            try:
                resp = await client.request("POST", path, body, headers)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if last:
                    raise
                continue
            if resp.status_code < 400:
                return resp
            await resp.aread()
            await resp.aclose()
            if resp.status_code in RETRYABLE_STATUS and not last:
                continue
            if resp.status_code >= 500:
                self._failed(f"answered {resp.status_code}")
            raise _upstream_error(resp)
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
            resp = await self._open(client, ctx)
            try:
                if resp.is_json():  # asked with stream false
                    yield self._whole(await resp.aread(), ctx)
                else:  # SSE (an upstream may stream whatever was asked)
                    async for chunk in self._chunks(resp, ctx):
                        yield chunk
            finally:
                await resp.aclose()
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

    async def _chunks(self, resp: UpstreamResponse, ctx: RequestContext) -> AsyncGenerator[Chunk, None]:
        """The upstream's SSE as chunks. Read a block at a time (whatever arrived), so that
        the chunks of one block go out together (Chunk.more) in one write to the client."""
        state = _SSEState()
        events = EventReader()
        async for block in resp.blocks():
            out = state.feed(events.feed(block), ctx.kind == "chat")
            for i, chunk in enumerate(out):
                chunk.more = i < len(out) - 1 or state.done  # after [DONE]: the end
                yield chunk
            if state.error is not None:
                raise state.error
            if state.done:
                resp.expect_end()  # the body's end may still be on its way: keep the connection
                return
        for chunk in state.feed(events.close(), ctx.kind == "chat"):  # an unfinished last event
            yield chunk
        if state.error is not None:
            raise state.error
        if not state.done and state.finish is not None:  # ended after its finish, without [DONE]
            yield state.end()
        elif not state.done:
            raise BackendError(f"upstream {self.name} ended the stream early", status=502,
                               code="upstream_incomplete")

    def _whole(self, data: bytes, ctx: RequestContext) -> Chunk:
        """A non-streamed completion as one chunk: its text, finish_reason and usage."""
        event = _parse_event(data)
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"upstream {self.name} answered without choices", status=502,
                               code="upstream_malformed")
        choice = choices[0]
        if ctx.kind == "chat":
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        usage = None
        u = event.get("usage")
        if isinstance(u, dict):
            usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
        return Chunk(text=text if isinstance(text, str) else "",
                     finish_reason=choice.get("finish_reason") or "stop", usage=usage)

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
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None


class _SSEState:
    """Parsing state of one upstream stream: usage and finish_reason seen so far, whether
    [DONE] came, and an error met after some chunks of the same block (raised after them)."""

    __slots__ = ("done", "error", "finish", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.done = False
        self.error: BackendError | None = None

    def feed(self, completed: list[bytes], chat: bool) -> list[Chunk]:
        """The data of the events the EventReader completed, as chunks."""
        datas: list[bytes] = []
        done = False
        for data in completed:
            if data.strip() == b"[DONE]":
                done = True
                break
            if data.strip():
                datas.append(data)
        events: Any = None
        if datas:  # the block's events in one parse; anything odd takes the careful path
            try:
                events = orjson.loads(b"[" + b",".join(datas) + b"]")
            except orjson.JSONDecodeError:
                events = None
            if events is None or not all(type(e) is dict and "error" not in e for e in events):
                return self._feed_each(datas, done, chat)
        out: list[Chunk] = []
        for event in events or ():
            self._take(event, chat, out)
        if done:
            out.append(self.end())
        return out

    def _feed_each(self, datas: list[bytes], done: bool, chat: bool) -> list[Chunk]:
        """Event by event: a malformed or error event raises after the chunks before it."""
        out: list[Chunk] = []
        for data in datas:
            try:
                event = _parse_event(data)
            except BackendError as exc:
                if not out:
                    raise
                self.error = exc  # the chunks before it still go out first
                return out
            self._take(event, chat, out)
        if done:
            out.append(self.end())
        return out

    def _take(self, event: dict[str, Any], chat: bool, out: list[Chunk]) -> None:
        u = event.get("usage")
        if u:
            self.usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                out.append(Chunk(text=text))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def end(self) -> Chunk:
        """The stream is done; its last chunk carries the finish_reason and usage seen."""
        self.done = True
        return Chunk(finish_reason=self.finish or "stop", usage=self.usage)


def _parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except ValueError:
        raise BackendError("upstream sent malformed JSON", code="upstream_malformed") from None
    if not isinstance(event, dict):
        raise BackendError("upstream sent an unexpected JSON value", code="upstream_malformed")
    if isinstance(event.get("error"), dict):
        message = str(event["error"].get("message") or "upstream error")
        raise BackendError(f"upstream error: {message}", status=502, code="upstream_error")
    return event


def _upstream_error(resp: UpstreamResponse) -> BackendError:
    """An upstream's error answer. A client's mistake or a rate limit passes through as the
    upstream said it (status, message, type, code, param, Retry-After); an upstream failure
    becomes 502."""
    status = resp.status_code
    fields: dict[str, Any] = {}
    try:
        err = resp.json().get("error", {})
        if isinstance(err, dict):
            fields = err
    except (ValueError, AttributeError):
        pass
    message = fields.get("message")
    message = str(message) if message else f"upstream answered {status}"
    if status not in PASS_STATUS:
        return BackendError(message, status=502, code="upstream_error")
    code = fields.get("code", "upstream_error")
    kind = fields.get("type")
    param = fields.get("param")
    return BackendError(message, status=status,
                        code=None if code is None else str(code),
                        type=kind if isinstance(kind, str) and kind else None,
                        param=param if isinstance(param, str) else None,
                        retry_after=retry_after_s(resp.retry_after))


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date; None if absent or odd."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(0.0, min(seconds, 86400.0)) if seconds == seconds else None
