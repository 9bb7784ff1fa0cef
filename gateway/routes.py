"""The routes other than generation (gateway/handler.py has those): models, health,
readiness, the admin memory report, metrics, the OpenAPI document."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import admin, openapi
from gateway.core.config import ModelConfig, TenantConfig, degrade_chain
from gateway.core.errors import NotFound
from gateway.core.worker import worker_id
from gateway.memory_report import memory_report
from gateway.state import GatewayState


def _state(request: Request) -> GatewayState:
    return cast(GatewayState, request.app.state.gateway)


def resolve_model(state: GatewayState, tenant: TenantConfig, name: str) -> tuple[ModelConfig, str | None]:
    """`model` or `model:adapter` -> (the tenant's model, the adapter asked for or None).

    A configured model name wins as a whole (names may contain ':'); otherwise the part after
    the last ':' names an adapter, which must be one this tenant may use with the model (its
    own or one of its allowed_adapters; the adapter_selection policy then checks the backend
    has it). Anything else is the one 404 an unknown model gets: another tenant's adapter and
    a name that exists nowhere answer alike, so no tenant can list another's adapters.
    """
    base, adapter = name, None
    if state.settings.model(name) is None and ":" in name:
        base, _, adapter = name.rpartition(":")
    model = state.settings.model(base)
    if (model is None or base not in tenant.models
            or (adapter is not None and adapter != tenant.adapters.get(base)
                and adapter not in tenant.allowed_adapters.get(base, ()))):
        raise NotFound(
            f"The model '{name}' does not exist or you do not have access to it.",
            param="model", code="model_not_found",
        )
    return model, adapter


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

    by_name = {m.name: m for m in settings.models}

    def servable(name: str) -> bool:  # a healthy replica of the model or of a tier below it
        return any(any(checks.get(b, False) for b in m.backends)
                   for m in degrade_chain(by_name, name) if m is not None)

    models = {m.name: servable(m.name) for m in settings.models}
    ok = state.ready and all(models.values())
    body = {"status": "ready" if ok else "not_ready", "backends": checks, "models": models}
    return JSONResponse(body, status_code=200 if ok else 503)


async def debug_memory(request: Request) -> Response:
    """Admin only: backend snapshots, requests in flight with their memory, tenant totals."""
    state = _state(request)
    state.admin.authenticate(request.headers.get("authorization"))
    report = memory_report(state.telemetry)
    report["reservations"] = state.policies.reservations.snapshot()  # admission's bytes held
    report["worker"] = worker_id()  # which gateway process answered (--workers N)
    quotas = state.policies.quotas
    if quotas is not None:
        report["shared_state"] = quotas.stats()
    return JSONResponse(report)


async def metrics(request: Request) -> Response:
    """Prometheus text format (no secrets, bounded labels; see gateway/metrics.py)."""
    state = _state(request)
    if state.metrics_key is not None:  # server.metrics_api_key_env set: a bearer key is needed
        state.metrics_key.authenticate(request.headers.get("authorization"))
    body = state.telemetry.scrape() + admin.budget_exposition(await admin.budgets(state))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi_document(request: Request) -> Response:
    """This gateway's own OpenAPI document (gateway/openapi.py)."""
    return JSONResponse(openapi.document(_state(request).settings))
