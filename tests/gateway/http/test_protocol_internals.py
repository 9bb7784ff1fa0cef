"""The uvicorn internals gateway/http/protocol.py and gateway/http/fast.py use (UVICORN_INTERNALS),
each checked on a real protocol, cycle and flow control: an upgrade of uvicorn that renames
or drops one fails here, loudly, instead of the fast path misbehaving."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import uvicorn.protocols.utils
from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from gateway.http.protocol import UVICORN_INTERNALS, GatewayHttpProtocol

ROOT = Path(__file__).resolve().parents[3]


def test_uvicorn_is_pinned_to_the_tested_minor_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("uvicorn"))
    m = re.fullmatch(r"uvicorn>=(\d+)\.(\d+)(?:\.\d+)?,<(\d+)\.(\d+)", pin)
    assert m is not None, f"uvicorn must be pinned to one minor version, not {pin!r}"
    major, minor, upper_major, upper_minor = map(int, m.groups())
    assert (upper_major, upper_minor) == (major, minor + 1), pin
    installed = importlib.metadata.version("uvicorn").split(".")
    assert (int(installed[0]), int(installed[1])) == (major, minor)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_every_internal_the_fast_path_uses_exists() -> None:
    async def probe() -> dict[str, Any]:
        config = Config(app=_app, lifespan="off", log_level="warning")
        config.load()
        state = ServerState()
        made: list[GatewayHttpProtocol] = []

        def factory() -> GatewayHttpProtocol:
            made.append(GatewayHttpProtocol(config=config, server_state=state, app_state={}))
            return made[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /elsewhere HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
        proto = made[0]
        found = {"protocol": proto, "cycle": proto.cycle, "flow": proto.flow,
                 "server_state": proto.server_state, "module": httptools_impl,
                 "utils": uvicorn.protocols.utils}
        writer.close()
        server.close()
        return found

    where = asyncio.run(probe())
    missing = [f"{kind}.{name}" for kind, name in UVICORN_INTERNALS if not hasattr(where[kind], name)]
    assert not missing, f"uvicorn no longer has what the fast path uses: {missing}"
    assert len(UVICORN_INTERNALS) > 50  # the list is the real one, not a stub
