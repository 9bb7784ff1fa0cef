"""The floor: a ~40-line Starlette pass-through proxy with an aiohttp client. Bytes in, bytes
out, no parsing. Run: python -m bench.overhead.floor --port P --upstream http://127.0.0.1:U."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    session: dict[str, aiohttp.ClientSession] = {}

    async def chat(request: Request) -> Response:
        body = await request.body()
        resp = await session["s"].post(f"{upstream}/v1/chat/completions", data=body,
                                       headers={"content-type": "application/json"})
        if resp.content_type != "text/event-stream":
            data = await resp.read()
            resp.release()
            return Response(data, resp.status, media_type=resp.content_type)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for part in resp.content.iter_any():
                    yield part
            finally:
                resp.release()

        return StreamingResponse(relay(), resp.status, media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await session["s"].close()

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])],
                     lifespan=lifespan)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args()
    uvicorn.run(build(a.upstream), host="127.0.0.1", port=a.port, access_log=False,
                log_level="warning")
