"""The one generation handler: POST /v1/chat/completions and /v1/completions, whatever carries
them. `gateway serve` answers them on its connections' fast writer (gateway/http/fast.py);
any other way in (another ASGI server, a query string, a root_path, in-process tests) takes
the ASGI writer (gateway/http/asgi.py). Both are a ResponseWriter; the handler does the rest
the same way for both: authentication, body checks, validation, the pipeline, the telemetry
record, the answer or the error, the headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import orjson

from gateway import validation
from gateway.core import context
from gateway.core.config import TenantConfig
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import ClientDisconnected, GatewayError, MethodNotAllowed, Unavailable
from gateway.pipeline import Pipeline
from gateway.routes import resolve_model
from gateway.shutdown import Drain
from gateway.sse import collect, stream_events
from gateway.state import GatewayState
from gateway.telemetry import RequestRecord

log = logging.getLogger("gateway.handler")

# The generation routes, declared once: path -> kind.
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}

INTERNAL_ERROR = orjson.dumps(GatewayError("The gateway failed to handle this request.").body())


class Media(Enum):
    JSON = "application/json"
    SSE = "text/event-stream"


class ResponseWriter(Protocol):
    """How one request's answer goes out: once (`respond`), or as server-sent events."""

    gone: bool  # the client went away (and the writer cancelled the handler's task)

    @property
    def started(self) -> bool:
        """Something of the answer went out already."""

    async def read_body(self, limit: int, timeout_s: float) -> bytes | bytearray:
        """The whole body, within `limit` bytes (413) and `timeout_s` seconds (408)."""

    async def respond(self, status: int, media: Media, headers: dict[str, str], body: bytes) -> None:
        """The whole answer. Past a stream's start it cuts the connection instead."""

    async def stream(self, headers: dict[str, str], events: AsyncGenerator[bytes, None]) -> None:
        """200 with server-sent events, until the last one (which ends with [DONE]); closes
        `events` whatever happens."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as far as its head: the route's kind, and the raw headers (lower-case names)."""

    kind: str
    method: str
    path: str
    headers: Sequence[tuple[bytes, bytes]]


class GenerationHandler:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

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
        authorization = ctype = length = request_id = None
        trace: dict[str, str] = {}
        for name, value in req.headers:
            if name == b"authorization":
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
        telemetry = self.state.telemetry
        rec = telemetry.open(req.kind, req.method, req.path, trace)
        try:
            try:
                if req.method != "POST":
                    raise MethodNotAllowed(f"Method {req.method} is not allowed on {req.path}.",
                                           headers={"allow": "POST"})
                await self._answer(req, out, authorization, ctype, length, rid, rec)
            except GatewayError as exc:
                rec.status = exc.status
                await out.respond(exc.status, Media.JSON,
                                  {**exc.response_headers(), "x-request-id": rid},
                                  orjson.dumps(exc.body()))
            except asyncio.CancelledError:
                if out.gone and not out.started:
                    rec.status = ClientDisconnected.status
                raise
            except Exception:
                log.exception("unhandled error on %s %s", req.method, req.path)
                rec.status = 500
                await out.respond(500, Media.JSON, {"x-request-id": rid}, INTERNAL_ERROR)
        finally:
            telemetry.close(rec)

    async def _answer(self, req: Incoming, out: ResponseWriter, authorization: str | None,
                      ctype: str | None, length: str | None, rid: str, rec: RequestRecord) -> None:
        state = self.state
        server = state.settings.server
        tenant = state.tenants.authenticate(authorization)
        validation.check_body_headers(ctype, length, server.max_body_bytes)
        body = validation.parse_body(await out.read_body(server.max_body_bytes, server.body_timeout_s))
        ctx = self.context(req.kind, tenant, body, rid)
        pipeline = Pipeline(state)
        chunks = pipeline.run(ctx, rec)
        drain = state.drain  # ends generations cleanly at shutdown (gateway/shutdown.py)
        if not ctx.stream:
            try:
                payload = orjson.dumps(await collect(ctx, chunks, drain))
                rec.status = 200
                await out.respond(200, Media.JSON, {**pipeline.headers(ctx), "x-request-id": rid},
                                  payload)
            finally:  # after the answer: the backend's and the policies' releases
                await chunks.aclose()
            return
        # The first chunk first: a failure before it still gets its own status code.
        first = await first_chunk(chunks, drain)
        rec.status = 200
        await out.stream({**pipeline.headers(ctx), "x-request-id": rid},
                         stream_events(ctx, chunks, first, drain))

    def context(self, kind: str, tenant: TenantConfig, body: dict[str, Any],
                request_id: str) -> RequestContext:
        """A validated body -> the request's context."""
        state = self.state
        chat = kind == "chat"
        validation.check_fields(body, validation.CHAT_FIELDS if chat else validation.COMPLETION_FIELDS)
        model, adapter = resolve_model(state, tenant, validation.model_name(body))
        stream, include_usage = validation.stream_flags(body)
        user = body.get("user")
        ctx = RequestContext(
            request_id=request_id,
            tenant=tenant.name,
            kind=kind,
            requested_model=model.name,
            target_model=model.name,
            backend=model.backend,
            sampling=validation.sampling(body, state.settings.server.default_max_tokens, chat=chat),
            stream=stream,
            include_usage=include_usage,
            messages=validation.messages(body) if chat else None,
            prompt=None if chat else validation.prompt(body),
            requested_adapter=adapter,  # the adapter_selection policy sets ctx.adapter
            user=user if isinstance(user, str) else None,
            created=time.time(),
            inference_objective=tenant.inference_objective,
        )
        if not state.ready:
            raise Unavailable("The gateway is starting; try again shortly.", retry_after=1)
        return ctx


async def first_chunk(chunks: AsyncGenerator[Chunk, None], drain: Drain) -> Chunk | None:
    try:
        return await drain.next(chunks)
    except StopAsyncIteration:
        await chunks.aclose()
        return None
    except BaseException:
        await chunks.aclose()
        raise
