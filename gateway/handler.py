"""The one generation handler: POST /v1/chat/completions, /v1/completions, /v1/responses and
/v1/embeddings, whatever carries them. `gateway serve` answers them on its connections' fast writer (gateway/http/fast.py);
any other way in (another ASGI server, a query string, a root_path, in-process tests) takes
the ASGI writer (gateway/http/asgi.py). Both are a ResponseWriter; the handler does the rest
the same way for both: authentication, body checks, validation, the pipeline, the telemetry
record, the answer or the error, the headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway import responses_api, validation
from gateway.core import context, cpu
from gateway.core.config import TenantConfig
from gateway.core.context import Chunk, RequestContext, SamplingParams
from gateway.core.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    Unavailable,
)
from gateway.http.contract import INTERNAL_ERROR, Incoming, Media, ResponseWriter
from gateway.pipeline import Pipeline
from gateway.routes import resolve_model
from gateway.shutdown import Drain
from gateway.sse import collect, stream_events
from gateway.state import GatewayState
from gateway.telemetry import RequestRecord
from gateway.usage import usage_metadata
from policies import priority

log = logging.getLogger("gateway.handler")

# Response headers a browser's script may read (with server.cors_origins).
CORS_EXPOSED = ("x-request-id", "x-gateway-backend", "x-gateway-adapter", "x-gateway-kv-bytes",
                "x-gateway-max-output-tokens", "x-gateway-degraded-from")

class GenerationHandler:
    def __init__(self, state: GatewayState) -> None:
        self.state = state  # a config reload swaps it (gateway/app.py)

    @property
    def header_timeout_s(self) -> float:
        return self.state.settings.server.header_timeout_s

    async def handle(self, req: Incoming, out: ResponseWriter) -> None:
        """Answer `req` through `out`. A client that goes away cancels the task (the writer
        does); that cancellation ends here, anything else's goes on."""
        try:
            await self._handle(req, out)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (out.gone and task is not None and task.uncancel() == 0):
                raise  # a server shutdown, not the client

    async def _handle(self, req: Incoming, out: ResponseWriter) -> None:
        authorization = ctype = length = request_id = origin = None
        trace: dict[str, str] = {}
        for name, value in req.headers:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                ctype = value.decode("latin-1")
            elif name == b"content-length":
                length = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value
            elif name == b"traceparent" or name == b"tracestate":
                trace[name.decode()] = value.decode("latin-1")
        rid = context.request_id(request_id)
        state = self.state  # the config this request starts under serves it to its end (reload)
        state.active += 1
        telemetry = state.telemetry
        cors = self._cors(origin) if origin is not None else {}
        rec = telemetry.open(req.kind, req.method, req.path, trace, rid)
        size = [0]  # the body's bytes, once read
        try:
            try:
                if req.method != "POST":
                    raise MethodNotAllowed(f"Method {req.method} is not allowed on {req.path}.",
                                           headers={"allow": "POST"})
                await self._answer(state, req, out, authorization, ctype, length,
                                   {**cors, "x-request-id": rid}, rec, size)
            except GatewayError as exc:
                rec.status = exc.status
                await out.respond(exc.status, Media.JSON,
                                  {**exc.response_headers(), **cors, "x-request-id": rid},
                                  orjson.dumps(exc.body()))
            except asyncio.CancelledError:
                if out.gone and not out.started:
                    rec.status = ClientDisconnected.status
                raise
            except Exception:
                log.exception("unhandled error on %s %s", req.method, req.path)
                rec.status = 500
                await out.respond(500, Media.JSON, {**cors, "x-request-id": rid}, INTERNAL_ERROR)
        finally:
            state.active -= 1
            telemetry.close(rec)
            if size[0] > cpu.INLINE_BYTES:  # its parsed body and token ids are garbage now
                cpu.pool().release_heap()

    def _cors(self, origin: str) -> dict[str, str]:
        """CORS headers for a configured origin (server.cors_origins; off by default). The
        preflight is answered by the app's CORS layer (gateway/app.py)."""
        origins = self.state.settings.server.cors_origins
        if not origins or (origin not in origins and "*" not in origins):
            return {}
        return {"access-control-allow-origin": origin,
                "access-control-expose-headers": ", ".join(CORS_EXPOSED)}

    async def _answer(self, state: GatewayState, req: Incoming, out: ResponseWriter,
                      authorization: str | None, ctype: str | None, length: str | None,
                      extra: dict[str, str], rec: RequestRecord, size: list[int]) -> None:
        server = state.settings.server
        tenant = state.tenants.authenticate(authorization)
        validation.check_body_headers(ctype, length, server.max_body_bytes)
        raw = await out.read_body(server.max_body_bytes, server.body_timeout_s)
        size[0] = len(raw)
        body = validation.parse_body(raw)
        ctx = self.context(req.kind, tenant, body, extra["x-request-id"], state)
        ctx.body_bytes = len(raw)  # bounds what its prompt can cost (admission's gate)
        if state.rollouts is not None:  # a rollout's side: primary or candidate
            state.rollouts.route(ctx, authorization)
        ctx.priority = priority.from_headers(tenant, req.headers)  # x-gateway-priority: 400 above
        pipeline = Pipeline(state)
        chunks = pipeline.run(ctx, rec)
        drain = state.drain  # ends generations cleanly at shutdown (gateway/shutdown.py)
        if not ctx.stream:
            try:
                answer = await collect(ctx, chunks, drain)
                if ctx.via_chat:
                    answer = responses_api.from_chat(ctx, answer)
                payload = orjson.dumps(answer)
                rec.status = 200
                await out.respond(200, Media.JSON, {**pipeline.headers(ctx), **extra}, payload)
            finally:  # after the answer: the backend's and the policies' releases
                await chunks.aclose()
            return
        # The first chunk first: a failure before it still gets its own status code.
        first = await first_chunk(chunks, drain)
        rec.status = 200
        events = (responses_api.stream_events(ctx, chunks, first, drain) if ctx.via_chat
                  else stream_events(ctx, chunks, first, drain))
        await out.stream({**pipeline.headers(ctx), **extra}, events)

    def context(self, kind: str, tenant: TenantConfig, body: dict[str, Any],
                request_id: str, state: GatewayState) -> RequestContext:
        """A validated body -> the request's context, under `state` (the config the request
        started under: a reload may swap self.state meanwhile). Only what the gateway itself
        needs is read here (the model, streaming, the output limit, n, the messages or prompt
        for counting); the backend reads the rest (remote kinds forward the body as sent)."""
        # bounds and valid Unicode first: before the model is resolved, before any CPU is spent
        validation.check_bounds(body, kind, state.settings.server.request_bounds)
        model, adapter = resolve_model(state, tenant, validation.model_name(body))
        validation.check_user(body)
        validation.check_metadata(body)
        if kind == "responses":
            validation.check_responses(body)
        stream, include_usage = validation.stream_flags(body)
        via_chat = False
        if kind == "responses" and not state.backends[model.backend].forwards("responses"):
            body, kind, via_chat = responses_api.to_chat(body), "chat", True
        if kind == "embeddings" and stream:
            raise InvalidRequest("Embeddings are not streamed.", param="stream")
        sampling = validation.sampling(body, kind)
        output_cap = self._output_cap(tenant, sampling, body, kind)
        user = body.get("user")
        ctx = RequestContext(
            request_id=request_id,
            tenant=tenant.name,
            kind=kind,
            requested_model=model.name,
            target_model=model.name,
            backend=model.backend,
            sampling=sampling,
            stream=stream,
            include_usage=include_usage,
            messages=validation.messages(body) if kind == "chat" else None,
            prompt=(validation.prompt(body) if kind == "completion"
                    else validation.prompt(body, "input") if kind == "embeddings" else None),
            requested_adapter=adapter,  # the adapter_selection policy sets ctx.adapter
            user=user if isinstance(user, str) else None,
            body=body,
            output_cap=output_cap,
            via_chat=via_chat,
            metadata=usage_metadata(body.get("metadata")),
            created=time.time(),
            inference_objective=tenant.inference_objective,
            priority=tenant.priority,
        )
        if not state.ready:
            raise Unavailable("The gateway is starting; try again shortly.", retry_after=1)
        return ctx

    @staticmethod
    def _output_cap(tenant: TenantConfig, sampling: SamplingParams,
                    body: dict[str, Any], kind: str) -> int | None:
        """The tenant's limits.max_output_tokens: a request asking more is a 400; one naming
        no limit gets the cap (returned: the remote kinds send it upstream, the response says
        it in x-gateway-max-output-tokens)."""
        cap = tenant.limits.max_output_tokens
        if cap is None or kind == "embeddings":
            return None
        name, asked = validation.output_limit(body, kind)
        if asked is None:
            sampling.max_tokens = cap
            return cap
        if asked > cap:
            raise InvalidRequest(
                f"'{name}' is {asked}; your account allows at most {cap} output tokens per "
                "request.", param=name, code="max_output_tokens_exceeded")
        return None


async def first_chunk(chunks: AsyncGenerator[Chunk, None], drain: Drain) -> Chunk | None:
    try:
        return await drain.next(chunks)
    except StopAsyncIteration:
        await chunks.aclose()
        return None
    except BaseException:
        await chunks.aclose()
        raise
