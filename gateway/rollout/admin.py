"""The operator's rollout routes (admin key only): GET /admin/rollouts and
POST /admin/rollouts/{model} with {"action": "advance" | "rollback" | "pause" | "resume" |
"promote"}."""

from __future__ import annotations

from typing import cast

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.core.errors import GatewayError, InvalidRequest, NotFound
from gateway.rollout.manager import Rollouts
from gateway.rollout.state import ACTIONS, MoveRefused
from gateway.rollout.store import StoreError
from gateway.state import GatewayState

MAX_BODY = 4096


def _rollouts(request: Request) -> Rollouts:
    state = cast(GatewayState, request.app.state.gateway)
    state.admin.authenticate(request.headers.get("authorization"))  # before anything else
    if state.rollouts is None:
        raise NotFound("No rollout is configured.", code="rollout_not_found")
    return state.rollouts


async def list_rollouts(request: Request) -> Response:
    """Each rollout: stage, share, the current window's figures, the last window's, the
    comparison report, and the history of moves with their reasons."""
    rollouts = _rollouts(request)
    return JSONResponse({"object": "list",
                         "data": [rollouts.describe(live) for live in rollouts.live.values()]})


async def act(request: Request) -> Response:
    rollouts = _rollouts(request)
    model = request.path_params["model"]
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise InvalidRequest("The body is too large for a rollout action.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be JSON: {\"action\": ...}.") from None
    action = body.get("action") if isinstance(body, dict) else None
    if action not in ACTIONS:
        raise InvalidRequest(f"'action' must be one of {', '.join(ACTIONS)}.", param="action")
    if model not in rollouts.live:
        raise NotFound(f"No rollout is configured for model '{model[:200]}'.",
                       param="model", code="rollout_not_found")
    try:
        await rollouts.act(model, action)
    except MoveRefused as exc:
        raise GatewayError(str(exc), status=409, code="rollout_conflict") from None
    except StoreError as exc:
        raise GatewayError(f"The rollout state could not be saved: {exc}", status=503) from None
    return JSONResponse(rollouts.describe(rollouts.live[model]))
