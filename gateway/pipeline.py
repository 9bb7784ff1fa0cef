"""From a validated RequestContext to backend chunks, with the policy chain in front."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway.core.context import Chunk, Decision, RequestContext
from gateway.core.errors import BackendError, GatewayError
from policies.base import Outcome

log = logging.getLogger("gateway.pipeline")

FALLBACK = "fallback"  # the Decision.policy that records a failover to degrade_to


class Pipeline:
    """One request's way through policies and its backend.

    `run` is an async generator: closing it early (client gone) closes the backend stream,
    which frees whatever the backend held for this request. The chunk with a finish_reason is
    the last one (Chunk's contract): callers answer the client with it and close the
    generator after, so the releases below run after the answer went out. The policy chain
    (state.policies) runs first; its on_finish hooks run whatever happens after (done, error,
    rejection, client gone), so nothing a policy reserved stays reserved.

    Fallback: when the backend fails before its first chunk with a server-side error
    (BackendError with status >= 500: connection refused, timeout, 5xx, adapter load
    failure), the attempt is finished (on_finish releases its reservation and replica) and
    the chain is applied once more on
      - another replica of the same model that is in rotation and has not failed it, else
      - the model's `degrade_to` tier, once, when the tenant allows degrading
        (x-gateway-degraded-from names the model asked for; `model` the one that answered).
    Each is a Decision("fallback", "modify") on ctx.decisions, so metrics count it. Once a
    chunk went out there is no fallback: the client gets an error event.
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
            failed: list[str] = []  # backends that failed this request before its first byte
            while True:
                stream = self._backend(ctx).generate(ctx)
                telemetry.generating(ctx)
                try:
                    try:
                        first = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except BackendError as exc:
                        failed.append(ctx.backend)
                        if not await self._fall_back(ctx, exc, failed):
                            raise
                        try:
                            await self._apply(ctx)  # the whole chain once more, on the new target
                        except GatewayError:
                            outcome = "rejected"
                            raise
                        continue
                    telemetry.chunk(ctx, first)
                    if first.finish_reason is not None:
                        outcome = "ok"  # the last chunk: closing after it is no cancellation
                        ctx.usage = first.usage
                    yield first
                    async for chunk in stream:
                        telemetry.chunk(ctx, chunk)
                        if chunk.finish_reason is not None:
                            outcome = "ok"
                            ctx.usage = chunk.usage
                        yield chunk
                    break
                finally:
                    await stream.aclose()
            outcome = "ok"
        except BackendError as exc:  # issue #8: every backend failure the client sees is counted
            telemetry.backend_failed(ctx, exc.code)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if outcome != "ok":
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

    async def _fall_back(self, ctx: RequestContext, exc: BackendError, failed: list[str]) -> bool:
        """Finish the failed attempt and point ctx at another replica of its model (one in
        rotation that has not failed it), else at the model's degrade_to tier (once, if the
        tenant may be degraded); the caller re-applies the chain. False: the error stands."""
        settings = self.state.settings
        model = settings.model(ctx.target_model)
        if exc.status < 500 or model is None or len(failed) > len(self.state.backends):
            return False
        spare = [b for b in model.backends if b not in failed
                 and b in self.state.backends and self.state.backends[b].available()]
        if spare:
            target, why = model.name, f"replica: retried on another replica of {model.name}"
        else:
            tenant = next((t for t in settings.tenants if t.name == ctx.tenant), None)
            if model.degrade_to is None or tenant is None or not tenant.allow_degrade:
                return False
            if any(d.policy == FALLBACK and d.reason.startswith("degrade") for d in ctx.decisions):
                return False  # one fallback to a smaller tier per request, no chains
            target, why = model.degrade_to, f"degraded: served by {model.degrade_to}"
        asked = ctx.degraded_from or (ctx.target_model if target != model.name else None)
        await self.state.policies.finish(ctx, "retried")  # release the first attempt's holds
        if target != model.name:
            ctx.requested_adapter = None  # the tenant's own adapter for that tier, if any
        ctx.target_model = target
        # The routing policy, when configured, re-picks among the target's replicas; without
        # it the target's first (or first spare) backend serves.
        target_backends = model.backends if target == model.name else settings.model(target).backends
        ctx.backend = spare[0] if spare else target_backends[0]
        ctx.adapter = None
        ctx.prompt_tokens = None  # the tier counts with its own tokenizer
        ctx.reservation = None
        ctx.memory.kv_bytes_reserved = 0
        ctx.decisions.append(Decision(
            policy=FALLBACK, action="modify", status=exc.status,
            reason=f"{why} (backend {failed[-1]} failed before the first byte: {exc.code})"))
        log.warning("request %s: backend %s failed (%s); %s",
                    ctx.request_id, failed[-1], exc.message, why)
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
