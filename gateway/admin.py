"""The operator's routes (admin key): POST /admin/reload, GET /debug/config and GET
/admin/usage; and the spend budgets' lines of /metrics."""

from __future__ import annotations

import os
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.metrics import worker_versions
from gateway.reload import Reloader
from gateway.state import GatewayState
from policies.admission import Admission

STATUS = {"ok": 200, "unchanged": 200, "invalid": 400, "failed": 503}
CODES = {"invalid": "config_invalid", "failed": "backend_start_failed"}


def _reloader(request: Request) -> Reloader:
    reloader = cast(Reloader, request.app.state.reloader)
    reloader.state.admin.authenticate(request.headers.get("authorization"))
    return reloader


async def reload(request: Request) -> Response:
    """Reload the config now and answer the result: 200 (ok, unchanged), 400 for a file that
    does not validate, 503 for a backend that could not start; both refusals leave the running
    config serving. Under `--workers N` every other worker is reloaded too (through the
    supervisor, in the background): `workers: "signalled"`."""
    reloader = _reloader(request)
    result = await reloader.reload("api")
    body = result.body()
    if result.refused:
        body["error"] = {"message": result.error, "type": "invalid_request_error"
                         if result.result == "invalid" else "server_error",
                         "param": None, "code": CODES[result.result]}
    elif reloader.tell_supervisor():
        body["workers"] = "signalled"
    return JSONResponse(body, status_code=STATUS[result.result])


async def debug_config(request: Request) -> Response:
    """What config this process serves: its version, where it came from, when it was loaded,
    the last reload's result; names of tenants, models, backends and policies (no keys, no
    digests). Under `--workers N`, `workers`: the version each live worker serves."""
    reloader = _reloader(request)
    state: GatewayState = reloader.state
    settings = state.settings
    body: dict[str, Any] = {
        "version": state.version,
        "source": settings.source,
        "loaded_at": state.loaded_at,
        "reload": settings.server.reload,
        "worker": os.getpid(),
        "tenants": sorted(t.name for t in settings.tenants),
        "models": [m.name for m in settings.models],
        "backends": {name: spec.kind for name, spec in settings.backends.items()},
        "policies": list(settings.policies),
        "last_reload": reloader.last.body() if reloader.last is not None else None,
    }
    if state.telemetry.metrics.multiprocess:
        body["workers"] = worker_versions()
    return JSONResponse(body)


async def budgets(state: GatewayState) -> dict[str, dict[str, Any]]:
    """Every budgeted tenant's current period (policies/budget.py's read): fleet-wide with
    shared_state, else this process's."""
    admission = state.policies.get("admission")
    if not isinstance(admission, Admission):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for tenant in state.settings.tenants:
        if tenant.limits.budget is not None:
            out[tenant.name] = await admission.budgets.read(tenant.name, tenant.limits.budget)
    return out


async def usage(request: Request) -> Response:
    """GET /admin/usage (admin key only): spend per budgeted tenant in its current calendar
    period (amount, spent, reserved and exposed by requests in flight, remaining, reset)."""
    state = cast(GatewayState, request.app.state.gateway)
    state.admin.authenticate(request.headers.get("authorization"))
    return JSONResponse({"object": "usage", "budgets": await budgets(state)})


BUDGET_GAUGES = (
    ("amount", "gateway_budget_amount", "A tenant's spend budget for its period (price units)."),
    ("spent", "gateway_budget_spent", "What a tenant spent in its current budget period."),
    ("reserved", "gateway_budget_reserved",
     "Budget reserved by a tenant's requests in flight (their estimates)."),
)


def budget_exposition(report: dict[str, dict[str, Any]]) -> bytes:
    """The budgets as Prometheus text, appended to /metrics (read at scrape time: with
    shared_state the fleet's figures, the same from every worker). Labels: tenant, period."""
    if not report:
        return b""
    lines: list[str] = []
    for field_name, name, doc in BUDGET_GAUGES:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        for tenant, r in report.items():
            label = tenant.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name}{{tenant="{label}",period="{r["period"]}"}} '
                         f"{float(r[field_name])!r}")
    return ("\n".join(lines) + "\n").encode()
