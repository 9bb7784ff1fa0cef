"""create_app(settings): builds everything; the lifespan starts and closes it."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.registry import backend_class
from gateway import admin, routes
from gateway.core import context
from gateway.core.backend import Backend
from gateway.core.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.core.worker import local_workers, worker_id
from gateway.handler import CORS_EXPOSED, GenerationHandler
from gateway.http.asgi import GenerationDispatch
from gateway.reload import Reloader, arm_sighup
from gateway.rollout import admin as rollout_admin
from gateway.rollout.manager import Rollouts
from gateway.rollout.metrics import RolloutMetrics
from gateway.rollout.shadow import ShadowRunner
from gateway.settings import Settings, load_settings
from gateway.shutdown import Drain
from gateway.state import GatewayState, build_state
from gateway.telemetry import Telemetry
from gateway.tracing import build_tracer_provider
from policies.redis_quotas import RedisQuotas

log = logging.getLogger("gateway")



class RequestIdMiddleware:
    """Pure ASGI: every response carries x-request-id (the client's if sane, else a new one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value
        request_id = context.request_id(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.response_headers())


async def _on_gateway_error(request: Request, exc: Exception) -> Response:
    return error_response(cast(GatewayError, exc))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    exc = cast(HTTPException, exc)
    if exc.status_code == 405:
        err: GatewayError = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    elif exc.status_code == 404:
        err = NotFound(f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
    else:
        err = GatewayError(str(exc.detail), status=exc.status_code)
    return error_response(err)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(GatewayError("The gateway failed to handle this request."))


def build_backends(settings: Settings) -> dict[str, Backend]:
    return {
        name: backend_class(spec.kind)(name, spec.config) for name, spec in settings.backends.items()
    }


def create_app(
    settings: Settings,
    backends: dict[str, Backend] | None = None,
    tracer_provider: TracerProvider | None = None,
    logger_provider: Any = None,
) -> Starlette:
    """`tracer_provider`, `logger_provider`: inject them (tests); by default the app builds
    and owns its own."""
    backends = backends if backends is not None else build_backends(settings)
    # -- telemetry
    owned_provider = None
    if tracer_provider is None:
        tracer_provider = owned_provider = build_tracer_provider(settings.telemetry)
    # Spans are built only where they go somewhere: an injected provider, or an OTLP endpoint.
    record = owned_provider is None or bool(settings.telemetry.otlp_endpoint)
    telemetry = Telemetry(settings, backends, tracer_provider, record_spans=record,
                          logger_provider=logger_provider)
    # -- end telemetry
    # -- scale-out: limits every gateway process shares, when configured
    shared = (RedisQuotas(settings.shared_state, local_workers(), process_id=worker_id())
              if settings.shared_state is not None else None)
    rollouts = Rollouts(RolloutMetrics(telemetry.metrics))  # -- rollouts
    state = build_state(settings, backends, telemetry, Drain(settings.server.shutdown_grace_s),
                        quotas=shared, rollouts=rollouts)
    telemetry.usage.is_key = lambda v: state.tenants.is_key(v) or state.admin.is_key(v)
    handler = GenerationHandler(state)

    def publish(new: GatewayState) -> None:  # a config reload swaps the state in (reload.py)
        handler.state = new
        app.state.gateway = new

    reloader = Reloader(state, publish)
    rollouts.run_shadow = ShadowRunner(rollouts, lambda: reloader.state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        try:
            if shared is not None:
                await shared.start()
            for backend in state.backends.values():
                await backend.start()
            await telemetry.start()
            await rollouts.start()  # saved stages before the first request
            # What start-up made (the model, torch's and the libraries' objects: about a
            # million) is moved out of the collector's sight: a full collection, which a large
            # body's parse can trigger (100,000 messages make 100,000 dicts), then scans only
            # what requests made since, instead of stalling every tenant on the event loop.
            gc.freeze()
            reloader.state.ready = True
            await reloader.start()
            yield {}
        finally:
            gc.unfreeze()  # what start-up made is collected at exit again (nanobind, xgrammar's
            # binding layer, reports instances left alive then as leaks, on stderr)
            reloader.state.ready = False
            retired = await reloader.aclose()
            await rollouts.aclose()
            for backend in [*reloader.state.backends.values(), *retired]:
                try:
                    await backend.aclose()
                except Exception:
                    log.exception("closing backend %s failed", backend.name)
            await telemetry.aclose()
            if shared is not None:
                await shared.aclose()
            if owned_provider is not None:
                owned_provider.shutdown()

    app = Starlette(
        routes=[
            Route("/v1/models", routes.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", routes.get_model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/ready", routes.ready, methods=["GET"]),
            Route("/debug/memory", routes.debug_memory, methods=["GET"]),
            Route("/debug/config", admin.debug_config, methods=["GET"]),
            Route("/admin/reload", admin.reload, methods=["POST"]),
            Route("/admin/usage", admin.usage, methods=["GET"]),
            Route("/admin/rollouts", rollout_admin.list_rollouts, methods=["GET"]),
            Route("/admin/rollouts/{model:path}", rollout_admin.act, methods=["POST"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
            Route("/openapi.json", routes.openapi_document, methods=["GET"]),
        ],
        exception_handlers={
            GatewayError: _on_gateway_error,
            HTTPException: _on_http_exception,
            Exception: _on_unexpected,
        },
        lifespan=lifespan,
    )
    # no slash redirects: Starlette's would answer `/admin/reload/` with a 307 to an absolute
    # URL built from the client's own Host header; an unknown path is a 404 in OpenAI's shape
    app.router.redirect_slashes = False
    app.state.gateway = state
    app.state.reloader = reloader
    app.state.generation_handler = handler  # the fast writer's too (gateway/http/protocol.py)
    app.add_middleware(RequestIdMiddleware)
    # outermost: the generation routes' ASGI writer (gateway serve's own connections answer
    # them through the fast writer before the ASGI app is involved)
    app.add_middleware(GenerationDispatch, handler=handler)
    if settings.server.cors_origins:  # -- fidelity: browsers, off by default
        # outside everything: it answers preflights (OPTIONS) for every route; the handler
        # puts the same allow-origin on the generation answers the fast writer sends
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.server.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=list(CORS_EXPOSED))
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for `uvicorn --factory gateway.app:app_from_env` (other ASGI servers;
    `gateway serve --workers N` runs gateway/workers.py): the config path from GATEWAY_CONFIG.
    A SIGHUP from here on is a reload (served once the app has started), never an exit."""
    arm_sighup()
    return create_app(load_settings(os.environ["GATEWAY_CONFIG"]))
