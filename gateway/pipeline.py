"""From a validated RequestContext to backend chunks, with the policy chain in front."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from gateway.core.backend import Backend
from gateway.core.context import Chunk, RequestContext
from gateway.core.errors import BackendError, GatewayError
from gateway.core.policy import Outcome
from gateway.state import GatewayState
from gateway.telemetry import RequestRecord

log = logging.getLogger("gateway.pipeline")


class Pipeline:
    """One request's way through policies and its backend.

    `run` is an async generator: closing it early (client gone) closes the backend stream,
    which frees whatever the backend held for this request. The chunk with a finish_reason is
    the last one (Chunk's contract): callers answer the client with it and close the
    generator after, so the releases below run after the answer went out. The policy chain
    (state.policies) runs first; its on_finish hooks run whatever happens after (done, error,
    rejection, client gone), so nothing a policy reserved stays reserved.

    Fallback: when the backend fails before its first chunk, the chain's Fallback policies
    are asked to take the request over (routing: another replica of the tier; degrade: the
    `degrade_to` tier, once, when the tenant allows it; see PolicyChain.fall_back). If one
    does, the attempt is finished (on_finish("retried") releases its reservation and
    replica) and the chain runs again on the new target. Once a chunk went out there is no
    fallback: the client gets an error event.
    """

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def run(self, ctx: RequestContext, rec: RequestRecord) -> AsyncGenerator[Chunk, None]:
        telemetry = self.state.telemetry
        telemetry.begin(rec, ctx)
        outcome: Outcome = "error"
        rollouts = self.state.rollouts
        answer = rollouts.recorder(ctx) if rollouts is not None and ctx.rollout else None
        try:
            try:
                await self._apply(ctx)
            except GatewayError:
                outcome = "rejected"
                raise
            while True:
                stream = self._backend(ctx).generate(ctx)
                telemetry.generating(rec)
                try:
                    try:
                        first = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except BackendError as exc:
                        ctx.failed_backends.append(ctx.backend)
                        if (len(ctx.failed_backends) > len(self.state.backends)
                                or not await self._fall_back(ctx, exc)):
                            raise
                        await self.state.policies.finish(ctx, "retried")  # the attempt's holds
                        ctx.reservation = None
                        ctx.memory.kv_bytes_reserved = 0
                        try:
                            await self._apply(ctx)  # the whole chain once more, on the new target
                        except GatewayError:
                            outcome = "rejected"
                            raise
                        continue
                    telemetry.chunk(rec, ctx, first)
                    if answer is not None:
                        answer.add(first)
                    if first.finish_reason is not None:
                        outcome = "ok"  # the last chunk: closing after it is no cancellation
                        ctx.usage = first.usage
                    yield first
                    async for chunk in stream:
                        telemetry.chunk(rec, ctx, chunk)
                        if answer is not None:
                            answer.add(chunk)
                        if chunk.finish_reason is not None:
                            outcome = "ok"
                            ctx.usage = chunk.usage
                        yield chunk
                    break
                finally:
                    await stream.aclose()
            outcome = "ok"
        except BackendError as exc:  # every backend failure the client sees is counted
            telemetry.backend_failed(rec, ctx, exc.code)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            if outcome != "ok":
                outcome = "cancelled"
            raise
        finally:
            await self.state.policies.finish(ctx, outcome)
            if rollouts is not None and ctx.rollout:  # its side's window; a shadow copy
                end = rec.generate_end or time.monotonic()
                rollouts.finished(ctx, outcome, None if rec.first_chunk is None
                                  else rec.first_chunk - rec.start, end - rec.start)

    async def _fall_back(self, ctx: RequestContext, exc: BackendError) -> bool:
        """A rollout's candidate hands a failed attempt to the primary first;
        then the chain's Fallback policies (replicas, a smaller tier)."""
        rollouts = self.state.rollouts
        if rollouts is not None and ctx.rollout == "candidate":
            decision = await rollouts.on_backend_error(ctx, exc)
            if decision.action == "modify":
                ctx.decisions.append(decision)
                return True
        return await self.state.policies.fall_back(ctx, exc)

    async def _apply(self, ctx: RequestContext) -> None:
        try:
            await self.state.policies.apply(ctx)
        except GatewayError as exc:
            exc.headers.update(self.headers(ctx))
            raise

    def _backend(self, ctx: RequestContext) -> Backend:
        backend = self.state.backends.get(ctx.backend)
        if backend is None:
            raise GatewayError(f"No backend named {ctx.backend!r} is configured.")
        return backend

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
        if ctx.rollout:
            headers["x-gateway-rollout"] = ctx.rollout
        if ctx.output_cap is not None:
            headers["x-gateway-max-output-tokens"] = str(ctx.output_cap)
        if ctx.memory.kv_bytes_peak:  # known once the answer is whole (not on a stream's head)
            headers["x-gateway-kv-peak-bytes"] = str(ctx.memory.kv_bytes_peak)
            # its share: a KV block k sequences share (prefix cache, n > 1) counts 1/k
            headers["x-gateway-kv-peak-share-bytes"] = str(ctx.memory.kv_bytes_peak_share)
        return headers
