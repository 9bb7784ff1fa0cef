"""From a validated RequestContext to backend chunks, with the policy chain in front."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.context import Chunk, RequestContext
from gateway.errors import GatewayError


class Pipeline:
    """One request's way through policies and its backend.

    `run` is an async generator: closing it early (client gone) closes the backend stream,
    which frees whatever the backend held for this request.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    async def run(self, ctx: RequestContext) -> AsyncIterator[Chunk]:
        backend = self.state.backends.get(ctx.backend)
        if backend is None:
            raise GatewayError(f"No backend named {ctx.backend!r} is configured.")
        stream = backend.generate(ctx)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    def headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {"x-gateway-backend": ctx.backend}
        if ctx.adapter:
            headers["x-gateway-adapter"] = ctx.adapter
        return headers
