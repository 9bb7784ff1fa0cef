"""The operator's routes (admin key): POST /admin/reload and GET /debug/config."""

from __future__ import annotations

import os
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.metrics import worker_versions
from gateway.reload import Reloader
from gateway.state import GatewayState

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
