"""From a validated RequestContext to backend chunks, with the policy chain in front."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.context import Chunk, RequestContext
from gateway.errors import GatewayError
from policies.base import Outcome


class Pipeline:
    """One request's way through policies and its backend.

    `run` is an async generator: closing it early (client gone) closes the backend stream,
    which frees whatever the backend held for this request. The policy chain (state.policies)
    runs first; its on_finish hooks run whatever happens after (done, error, rejection,
    client gone), so nothing a policy reserved stays reserved.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    async def run(self, ctx: RequestContext) -> AsyncIterator[Chunk]:
        telemetry = self.state.telemetry
        telemetry.begin(ctx)
        outcome: Outcome = "error"
        try:
            try:
                await self.state.policies.apply(ctx)
            except GatewayError as exc:
                outcome = "rejected"
                exc.headers.update(self.headers(ctx))
                raise
            backend = self.state.backends.get(ctx.backend)
            if backend is None:
                raise GatewayError(f"No backend named {ctx.backend!r} is configured.")
            telemetry.generating(ctx)
            stream = backend.generate(ctx)
            try:
                async for chunk in stream:
                    telemetry.chunk(ctx, chunk)
                    yield chunk
            finally:
                await stream.aclose()
            outcome = "ok"
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            await self.state.policies.finish(ctx, outcome)

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
