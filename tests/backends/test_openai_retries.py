"""The `openai` kind's retries, rotation and adapter naming, against an in-process upstream
(httpx.MockTransport: exact attempt counts, no sockets, no sleeps worth waiting for)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import orjson
import pytest

from backends.openai import OpenAIBackend, OpenAIConfig
from backends.vllm import VLLMConfig
from gateway.core.context import RequestContext, SamplingParams
from gateway.core.errors import BackendError
from gateway.core.media import is_json_media
from tests.backends.chunks import text_of

STREAM = (
    'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    'data: {"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
    'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    "data: [DONE]\n\n"
)

Handler = Callable[[httpx.Request], httpx.Response]


class _HttpxResponse:
    """An httpx response with backends/upstream_http's UpstreamResponse interface."""

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status_code = resp.status_code
        self.retry_after = resp.headers.get("retry-after")
        self.content = b""

    async def blocks(self) -> AsyncIterator[bytes]:
        async for part in self._resp.aiter_bytes():
            yield part

    async def aread(self) -> bytes:
        self.content = await self._resp.aread()
        return self.content

    def is_json(self) -> bool:
        return is_json_media(self._resp.headers.get("content-type", ""))

    def json(self) -> Any:
        return orjson.loads(self.content)

    def expect_end(self) -> None:
        pass

    async def aclose(self) -> None:
        await self._resp.aclose()


class HttpxUpstream:
    """The `openai` kind's generation client over an httpx.AsyncClient, so that both of its
    paths run over one httpx.MockTransport."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> _HttpxResponse:
        hdrs = {**(headers or {}), **({"content-type": "application/json"} if body else {})}
        req = self.client.build_request(method, path, content=body, headers=hdrs,
                                        **({"timeout": timeout} if timeout is not None else {}))
        return _HttpxResponse(await self.client.send(req, stream=True))

    async def aclose(self) -> None:
        await self.client.aclose()


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def backend(handler: Handler, **cfg: object) -> OpenAIBackend:
    b = OpenAIBackend("up", OpenAIConfig(url="http://up/v1", retry_backoff_s=0.001,
                                         cooldown_s=0.05, **cfg))  # type: ignore[arg-type]
    b._client = httpx.AsyncClient(base_url="http://up/v1", transport=httpx.MockTransport(handler))
    b._http = HttpxUpstream(b._client)  # the generation path over the same mock
    return b


def request(adapter: str | None = None, stream: bool = False) -> RequestContext:
    return RequestContext(request_id="r", tenant="t", kind="chat", requested_model="demo",
                          target_model="demo", backend="up", sampling=SamplingParams(max_tokens=4),
                          messages=[{"role": "user", "content": "hi"}], adapter=adapter,
                          stream=stream)


async def text(b: OpenAIBackend, ctx: RequestContext | None = None) -> str:
    return "".join([text_of(c) async for c in b.generate(ctx or request())])


class Upstream:
    """Answers `script` in order (a status, or "refuse" for a connect error), then 200s."""

    def __init__(self, *script: int | str) -> None:
        self.script = list(script)
        self.calls: list[httpx.Request] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.calls.append(req)
        if req.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": []})
        step = self.script.pop(0) if self.script else 200
        if step == "refuse":
            raise httpx.ConnectError("connection refused", request=req)
        if step == 200:
            return httpx.Response(200, text=STREAM, headers={"content-type": "text/event-stream"})
        return httpx.Response(int(step), json={"error": {"message": f"status {step}"}})

    def posts(self) -> int:
        return sum(1 for c in self.calls if c.method == "POST")


async def test_pre_stream_503_and_connect_errors_are_retried() -> None:
    up = Upstream(503, "refuse")
    b = backend(up)
    assert await text(b) == "Hello"
    assert up.posts() == 3 and b.retried == 2 and b.available()


async def test_retries_are_bounded_then_out_of_rotation_then_back() -> None:
    up = Upstream(502, 504, 503, 503)
    b = backend(up, retries=2)
    with pytest.raises(BackendError) as info:
        await text(b)
    assert up.posts() == 3 and info.value.status == 502
    assert not b.available()
    with pytest.raises(BackendError) as fast:  # out of rotation: fails without a request
        await text(b)
    assert fast.value.status == 503 and fast.value.code == "upstream_unavailable"
    assert up.posts() == 3
    for _ in range(100):  # the background probe (GET /models) puts it back
        if b.available():
            break
        await asyncio.sleep(0.01)
    assert b.available()
    assert await text(b) == "Hello"  # the 4th scripted 503 is retried, then 200
    await b.aclose()


async def test_500_and_client_errors_are_not_retried() -> None:
    for status, expect in ((500, 502), (400, 400), (429, 429)):
        up = Upstream(status)
        b = backend(up)
        with pytest.raises(BackendError) as info:
            await text(b)
        assert up.posts() == 1 and info.value.status == expect
        assert b.available() == (status < 500)
        await b.aclose()


async def test_no_retry_once_a_byte_went_out() -> None:
    calls = []

    def dies_mid_stream(req: httpx.Request) -> httpx.Response:
        calls.append(req)

        async def body():  # type: ignore[no-untyped-def]
            yield b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
            raise httpx.ReadError("reset", request=req)

        return httpx.Response(200, content=body())

    b = backend(dies_mid_stream)
    got = []
    with pytest.raises(BackendError):
        async for chunk in b.generate(request(stream=True)):
            got.append(text_of(chunk))
    assert got == ["Hel"] and len(calls) == 1 and not b.available()
    await b.aclose()


@pytest.mark.parametrize(("fmt", "expect"), [
    (None, "demo"), ("{model}:{adapter}", "demo:acme"), ("{adapter}", "acme")])
async def test_adapter_model_format(fmt: str | None, expect: str) -> None:
    up = Upstream()
    b = backend(up, adapter_model=fmt)
    await text(b, request("acme"))
    assert json.loads(up.calls[0].content)["model"] == expect
    await text(b, request(None))
    assert json.loads(up.calls[1].content)["model"] == "demo"


def test_bad_adapter_model_format_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="adapter_model"):
        OpenAIConfig(url="http://x", adapter_model="{tenant}")
    assert VLLMConfig().adapter_model == "{adapter}"
