"""One generation handler, two writers: a request answered on `gateway serve`'s fast writer
(the route as it is) and the same request answered through the ASGI writer (a query string
sends it there) get the same status, headers and body, for every error the handler can give
and in both stream modes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ENV, back_in_rotation, hostile_config
from tests.e2e.hostile_upstream import HostileUpstream
from tests.server import running_gateway

KEY = "sk-demo-acme"
PATHS = ("/v1/chat/completions", "/v1/chat/completions?route=asgi")


@pytest.fixture(scope="module")
def gateway(hostile: HostileUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = hostile_config(hostile.url, read_timeout=1)
    cfg["server"]["max_body_bytes"] = "16KiB"
    cfg["models"].append({"name": "hidden", "backend": "up"})
    cfg["tenants"][0]["adapters"] = {"up": "acme-support"}
    with running_gateway(cfg, tmp_path_factory.mktemp("one-handler"), env=ENV) as url:
        yield url.removesuffix("/v1")


def chat(text: str = "plain hi", **extra: Any) -> dict[str, Any]:
    return {"model": "up", "messages": [{"role": "user", "content": text}], **extra}


# (case, body or raw bytes, headers beyond the defaults); each runs streamed and not
CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("invalid JSON", b"{not json", {}),
    ("empty body", b"", {}),
    ("not an object", b"[1, 2]", {}),
    ("wrong content type", chat(), {"content-type": "text/plain"}),
    ("body over max_body_bytes", chat("plain " + "x" * 20000), {}),
    ("no key", chat(), {"authorization": ""}),
    ("wrong key", chat(), {"authorization": "Bearer sk-wrong"}),
    ("not a bearer key", chat(), {"authorization": "Basic c2stZGVtbw=="}),
    ("unknown model", chat(model="nope"), {}),
    ("a model the tenant may not use", chat(model="hidden"), {}),
    ("an adapter the tenant may not use", chat(model="up:globex-legal"), {}),
    # what the gateway itself reads (the rest goes upstream as sent: tests/e2e/test_fidelity.py)
    ("a param out of range", chat(max_tokens=0), {}),
    ("a param of the wrong type", chat(n="two"), {}),
    ("no messages", {"model": "up", "messages": []}, {}),
    ("upstream says 400", chat("invalid x"), {}),
    ("upstream says 429", chat("rate-limited x"), {}),
    ("upstream closes (502)", chat("close x"), {}),
    ("upstream stalls (504)", chat("stall x"), {}),
]


def send(base: str, path: str, body: Any, headers: dict[str, str], stream: bool) -> httpx.Response:
    if isinstance(body, dict):
        body = json.dumps({**body, "stream": stream}).encode()
    hdrs = {"authorization": f"Bearer {KEY}", "content-type": "application/json",
            "x-request-id": "same-request", **headers}
    hdrs = {k: v for k, v in hdrs.items() if v}
    return httpx.post(base + path, content=body, headers=hdrs, timeout=30)


def seen(r: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    return r.status_code, {k: v for k, v in r.headers.items() if k != "date"}, r.content


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("case", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_both_writers_give_the_same_error(gateway: str, case: str, body: Any,
                                         headers: dict[str, str], stream: bool) -> None:
    answers = []
    for path in PATHS:
        answers.append(seen(send(gateway, path, body, headers, stream)))
        if "upstream" in case:
            back_in_rotation(gateway + "/v1")
    fast, asgi = answers
    assert fast[0] >= 400, fast
    assert fast == asgi
    assert set(json.loads(fast[2])) == {"error"}


def test_both_writers_give_the_same_405(gateway: str) -> None:
    got = [seen(httpx.get(gateway + path, headers={"x-request-id": "same-request"}))
           for path in PATHS]
    assert got[0][0] == 405 and got[0] == got[1]
    assert got[0][1]["allow"] == "POST"
