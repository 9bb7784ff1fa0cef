"""create_app(settings): builds everything; the lifespan starts and closes it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from opentelemetry.trace import TracerProvider
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.registry import backend_class
from gateway import routes
from gateway.core import context
from gateway.core.backend import Backend
from gateway.core.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.core.residency import SharesResidency
from gateway.core.worker import local_workers, worker_id
from gateway.handler import GenerationHandler
from gateway.http.asgi import GenerationDispatch
from gateway.settings import Settings, load_settings
from gateway.shutdown import Drain
from gateway.state import GatewayState
from gateway.telemetry import Telemetry
from gateway.tenants import AdminKey, TenantDirectory
from gateway.tracing import build_tracer_provider
from policies.registry import build_chain
from policies.shared_residency import SharedResidency
from policies.shared_state import SharedState

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
) -> Starlette:
    """`tracer_provider`: inject one (tests); by default the app builds and owns its own."""
    backends = backends if backends is not None else build_backends(settings)
    # -- telemetry (issue #5)
    owned_provider = None
    if tracer_provider is None:
        tracer_provider = owned_provider = build_tracer_provider(settings.telemetry)
    # Spans are built only where they go somewhere: an injected provider, or an OTLP endpoint.
    record = owned_provider is None or bool(settings.telemetry.otlp_endpoint)
    telemetry = Telemetry(settings, backends, tracer_provider, record_spans=record)
    # -- end telemetry
    # -- scale-out (issue 15): limits every gateway process shares, when configured
    shared = (SharedState(settings.shared_state, local_workers(), process_id=worker_id())
              if settings.shared_state is not None else None)
    if shared is not None:  # adapters on servers every process shares: decided fleet-wide
        residency = SharedResidency(shared)
        for backend in backends.values():
            if isinstance(backend, SharesResidency):
                backend.share_residency(residency)
    state = GatewayState(
        settings=settings,
        tenants=TenantDirectory(settings.tenants),
        admin=AdminKey(settings.server.admin_api_key_env),
        backends=backends,
        policies=build_chain(settings.policies, settings.policy_options, settings.models,
                             settings.tenants, backends, quotas=shared),
        telemetry=telemetry,
        drain=Drain(settings.server.shutdown_grace_s),
        metrics_key=(AdminKey(settings.server.metrics_api_key_env)
                     if settings.server.metrics_api_key_env else None),
    )
    telemetry.attach_policies(state.policies)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        try:
            if shared is not None:
                await shared.start()
            for backend in state.backends.values():
                await backend.start()
            await telemetry.start()
            state.ready = True
            yield {}
        finally:
            state.ready = False
            for backend in state.backends.values():
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
    app.state.gateway = state
    app.add_middleware(RequestIdMiddleware)
    # outermost: the generation routes' ASGI writer (gateway serve's own connections answer
    # them through the fast writer before the ASGI app is involved)
    app.add_middleware(GenerationDispatch, handler=GenerationHandler(state))
    return app


def app_from_env() -> Starlette:
    """An app factory for other ASGI servers (`uvicorn --factory gateway.app:app_from_env`):
    the config path from GATEWAY_CONFIG. `gateway serve --workers N` runs gateway/workers.py."""
    return create_app(load_settings(os.environ["GATEWAY_CONFIG"]))
