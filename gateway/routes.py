"""HTTP handlers: authenticate, validate, hand to the pipeline, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import openapi, validation
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import (
    ClientDisconnected,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    UnsupportedMediaType,
)
from gateway.core.media import is_json_media
from gateway.memory_report import memory_report
from gateway.pipeline import Pipeline
from gateway.core.config import ModelConfig, TenantConfig
from gateway.shutdown import Drain
from gateway.sse import DONE, collect, stream_events

T = TypeVar("T")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _state(request: Request) -> Any:
    return request.app.state.gateway


def check_body_headers(ctype: str | None, declared: str | None, limit: int) -> None:
    """Content-Type JSON (or absent) and a declared Content-Length within the limit."""
    if ctype is not None and not is_json_media(ctype):  # absent: taken as JSON
        media = ctype.partition(";")[0].strip().lower()
        raise UnsupportedMediaType(
            f"Content-Type {media or '(empty)'!r} is not supported; send application/json.")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


def body_timeout(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"The request body was not received within {timeout_s:g} s.")


def parse_body(body: bytes | bytearray) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest naming what is wrong."""
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    data: Any = _STDLIB_PARSE_FAILED
    if _LONG_DIGITS.search(body) is None:  # orjson reads integers past 64 bits as floats
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(body)  # the common case, fast
    if data is _STDLIB_PARSE_FAILED:
        data = _parse_json_stdlib(bytes(body))  # same answer and errors as before
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


async def read_json(request: Request, limit: int, timeout_s: float = 30.0) -> dict[str, Any]:
    check_body_headers(request.headers.get("content-type"), request.headers.get("content-length"),
                       limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):  # a slow sender must not hold a worker
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_large(limit)
    except TimeoutError:
        raise body_timeout(timeout_s) from None
    return parse_body(body)


_STDLIB_PARSE_FAILED = object()
_LONG_DIGITS = re.compile(rb"\d{19}")


def _parse_json_stdlib(body: bytes) -> Any:
    """json.loads, whose behaviour is the reference: NaN/Infinity literals and integers past
    64 bits parse (and the validators name the param), UTF-16/32 bodies are decoded. orjson
    refuses those, so a body orjson refuses is parsed again here."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "not valid JSON"
        raise InvalidRequest(f"The request body is {reason}.", code="invalid_json") from None


def resolve_model(state: Any, tenant: TenantConfig, name: str) -> tuple[ModelConfig, str | None]:
    """`model` or `model:adapter` -> (the tenant's model, the adapter asked for or None).

    A configured model name wins as a whole (names may contain ':'); otherwise the part after
    the last ':' names an adapter, which the adapter_selection policy checks.
    """
    base, adapter = name, None
    if state.settings.model(name) is None and ":" in name:
        base, _, adapter = name.rpartition(":")
    model = state.settings.model(base)
    if model is None or base not in tenant.models or adapter == "":
        raise NotFound(
            f"The model '{name}' does not exist or you do not have access to it.",
            param="model", code="model_not_found",
        )
    return model, adapter


class _DisconnectWatch:
    """Cancel the current task when the client goes away (an ASGI `http.disconnect`).

    One watcher task per request: the work itself runs in the request's own task (no second
    task, no asyncio.wait). `gone` tells a client-caused cancellation from any other (server
    shutdown), which stays a CancelledError.
    """

    __slots__ = ("_receive", "_task", "_watcher", "done", "gone")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self.gone = False
        self.done = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.done and self._task is not None:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self.done = True
        self._watcher.cancel()

    def client_gone(self) -> bool:
        """Called on CancelledError: True (and the cancellation absorbed) if it was ours."""
        return self.gone and self._task is not None and self._task.uncancel() == 0


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (non-streaming requests)."""
    watch = _DisconnectWatch(request.receive)
    try:
        return await work  # cancelled here, the generation releases what it holds
    except asyncio.CancelledError:
        if watch.client_gone():
            raise ClientDisconnected("The client closed the connection.") from None
        raise
    finally:
        watch.stop()


class EventStreamResponse(Response):
    """SSE without StreamingResponse's task group: one watcher task cancels the stream when
    the client disconnects, and the events generator is always closed (releasing the
    generation). Same status line and headers as StreamingResponse(media_type=SSE)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        events = self.events
        watch = _DisconnectWatch(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            ended = False
            async for event in events:
                if event.endswith(DONE):  # the last event: sent with the end of the body
                    watch.done = ended = True
                    await send({"type": "http.response.body", "body": event, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": event, "more_body": True})
            if not ended:
                watch.done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.client_gone():
                raise
        finally:
            watch.stop()
            await events.aclose()  # type: ignore[attr-defined]


def begin_generation(state: Any, kind: str, tenant: TenantConfig, body: dict[str, Any],
                     request_id: str) -> tuple[RequestContext, Pipeline]:
    """A validated body -> the request's context and its pipeline (both HTTP paths)."""
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
    )
    if not state.ready:
        raise Unavailable("The gateway is starting; try again shortly.", retry_after=1)
    return ctx, Pipeline(state)


async def _generate(request: Request, kind: str) -> Response:
    """The ASGI path (any ASGI server, in-process tests); `gateway serve` answers these routes
    on gateway/fastpath.py's path, with the same steps."""
    state = _state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    body = await read_json(request, state.settings.server.max_body_bytes,
                           state.settings.server.body_timeout_s)
    ctx, pipeline = begin_generation(state, kind, tenant, body, request.scope["state"]["request_id"])
    chunks = pipeline.run(ctx)
    drain = state.drain  # ends generations cleanly at shutdown (gateway/shutdown.py)
    if not ctx.stream:
        try:
            result = await _until_disconnect(request, collect(ctx, chunks, drain))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        return Response(orjson.dumps(result), headers=pipeline.headers(ctx),
                        media_type="application/json")
    # Wait for the first chunk so that failures before the first byte get a real status code.
    first = await _until_disconnect(request, first_chunk(chunks, drain))
    return EventStreamResponse(stream_events(ctx, chunks, first, drain),
                               headers={**SSE_HEADERS, **pipeline.headers(ctx)})


async def first_chunk(chunks: AsyncIterator[Chunk], drain: Drain) -> Chunk | None:
    try:
        return await drain.next(chunks)
    except StopAsyncIteration:
        await chunks.aclose()  # type: ignore[attr-defined]
        return None
    except BaseException:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        raise


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


def _model_card(model: ModelConfig, created: int) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": created, "owned_by": "gateway"}


async def list_models(request: Request) -> Response:
    state = _state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    created = int(state.started)
    data = [_model_card(m, created) for m in state.settings.models if m.name in tenant.models]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = _state(request)
    tenant = state.tenants.authenticate(request.headers.get("authorization"))
    model, _ = resolve_model(state, tenant, request.path_params["model_id"])
    return JSONResponse(_model_card(model, int(state.started)))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """Ready when every model can be served: one of its replicas is healthy, or (through the
    pre-first-byte fallback) a tier it degrades to is."""
    state = _state(request)
    checks: dict[str, bool] = {}
    if state.ready:
        for name, backend in state.backends.items():
            try:
                checks[name] = bool(await backend.health())
            except Exception:
                checks[name] = False
    settings = state.settings

    def servable(name: str, seen: frozenset[str]) -> bool:
        model = settings.model(name)
        if model is None or name in seen:
            return False
        if any(checks.get(b, False) for b in model.backends):
            return True
        return model.degrade_to is not None and servable(model.degrade_to, seen | {name})

    models = {m.name: servable(m.name, frozenset()) for m in settings.models}
    ok = state.ready and all(models.values())
    body = {"status": "ready" if ok else "not_ready", "backends": checks, "models": models}
    return JSONResponse(body, status_code=200 if ok else 503)


async def debug_memory(request: Request) -> Response:
    """Admin only: backend snapshots, requests in flight with their memory, tenant totals."""
    state = _state(request)
    state.admin.authenticate(request.headers.get("authorization"))
    report = memory_report(state.telemetry)
    report["reservations"] = state.policies.ledger.snapshot()  # admission's bytes held
    return JSONResponse(report)


async def metrics(request: Request) -> Response:
    """Prometheus text format (no secrets, bounded labels; see gateway/metrics.py)."""
    state = _state(request)
    if state.metrics_key is not None:  # server.metrics_api_key_env set: a bearer key is needed
        state.metrics_key.authenticate(request.headers.get("authorization"))
    body = state.telemetry.scrape()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi_document(request: Request) -> Response:
    """This gateway's own OpenAPI document (gateway/openapi.py)."""
    return JSONResponse(openapi.document(_state(request).settings))
