"""From a validated RequestContext to backend chunks, with the policy chain in front."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway.context import Chunk, Decision, RequestContext
from gateway.errors import BackendError, GatewayError
from policies.base import Outcome

log = logging.getLogger("gateway.pipeline")

FALLBACK = "fallback"  # the Decision.policy that records a failover to degrade_to


class Pipeline:
    """One request's way through policies and its backend.

    `run` is an async generator: closing it early (client gone) closes the backend stream,
    which frees whatever the backend held for this request. The policy chain (state.policies)
    runs first; its on_finish hooks run whatever happens after (done, error, rejection,
    client gone), so nothing a policy reserved stays reserved.

    Fallback: when the backend fails before its first chunk with a server-side error
    (BackendError with status >= 500: connection refused, timeout, 5xx, adapter load
    failure) and the model names a `degrade_to` tier the tenant may be degraded to, the
    first attempt is finished (on_finish releases its reservation and replica), ctx is
    re-routed to the degrade_to model and the chain is applied once more. A Decision
    ("fallback", "modify") records it; x-gateway-degraded-from names the model asked for.
    Once a chunk went out there is no fallback: the client gets an error event.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    async def run(self, ctx: RequestContext) -> AsyncIterator[Chunk]:
        telemetry = self.state.telemetry
        telemetry.begin(ctx)
        outcome: Outcome = "error"
        try:
            try:
                await self._apply(ctx)
            except GatewayError:
                outcome = "rejected"
                raise
            fell_back = False
            while True:
                stream = self._backend(ctx).generate(ctx)
                telemetry.generating(ctx)
                try:
                    try:
                        first = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except BackendError as exc:
                        if fell_back or not await self._fall_back(ctx, exc):
                            raise
                        fell_back = True
                        try:
                            await self._apply(ctx)  # the whole chain once more, on degrade_to
                        except GatewayError:
                            outcome = "rejected"
                            raise
                        continue
                    telemetry.chunk(ctx, first)
                    yield first
                    async for chunk in stream:
                        telemetry.chunk(ctx, chunk)
                        yield chunk
                    break
                finally:
                    await stream.aclose()
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            await self.state.policies.finish(ctx, outcome)

    async def _apply(self, ctx: RequestContext) -> None:
        try:
            await self.state.policies.apply(ctx)
        except GatewayError as exc:
            exc.headers.update(self.headers(ctx))
            raise

    def _backend(self, ctx: RequestContext) -> Any:
        backend = self.state.backends.get(ctx.backend)
        if backend is None:
            raise GatewayError(f"No backend named {ctx.backend!r} is configured.")
        return backend

    async def _fall_back(self, ctx: RequestContext, exc: BackendError) -> bool:
        """Finish the failed attempt and point ctx at its model's degrade_to tier (the caller
        re-applies the chain); False (the error stands) when there is none or the tenant
        may not degrade."""
        settings = self.state.settings
        model = settings.model(ctx.target_model)
        if exc.status < 500 or model is None or model.degrade_to is None:
            return False
        tenant = next((t for t in settings.tenants if t.name == ctx.tenant), None)
        if tenant is None or not tenant.allow_degrade:
            return False
        failed = ctx.backend
        asked = ctx.degraded_from or ctx.target_model
        await self.state.policies.finish(ctx, "error")  # release the first attempt's holds
        ctx.target_model = model.degrade_to
        ctx.requested_adapter = None  # the tenant's own adapter for that tier, if any
        ctx.adapter = None
        ctx.prompt_tokens = None  # the tier counts with its own tokenizer
        ctx.reservation = None
        ctx.memory.kv_bytes_reserved = 0
        ctx.decisions.append(Decision(
            policy=FALLBACK, action="modify", status=exc.status,
            reason=f"backend {failed} failed before the first byte ({exc.code}): "
                   f"served by {model.degrade_to}"))
        log.warning("request %s: backend %s failed (%s); falling back to %s",
                    ctx.request_id, failed, exc.message, model.degrade_to)
        ctx.degraded_from = asked
        return True

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {
            "x-gateway-backend": ctx.backend,
            "x-gateway-kv-bytes": str(ctx.memory.kv_bytes_reserved),
            "x-gateway-queue-ms": str(round(ctx.queue_seconds * 1000)),
            "x-gateway-trimmed-tokens": str(ctx.trimmed_tokens),
        }
        if ctx.adapter:
            headers["x-gateway-adapter"] = ctx.adapter
        if ctx.degraded_from:
            headers["x-gateway-degraded-from"] = ctx.degraded_from
        return headers
