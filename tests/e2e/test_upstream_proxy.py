"""HTTP(S)_PROXY and NO_PROXY, one rule for every client of a backend: the
generation pool and the httpx control plane (the health probe behind /ready) both go through
the proxy the environment names, or both go direct; `trust_env: false` ignores it."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ENV, ask, hostile_config
from tests.e2e.forward_proxy import ForwardProxy
from tests.e2e.hostile_upstream import HostileUpstream, answer_text
from tests.server import running_gateway


def serve_through(hostile: HostileUpstream, tmp: Path, env: dict[str, str], **backend: Any
                  ) -> None:
    with running_gateway(hostile_config(hostile.url, **backend), tmp, env={**ENV, **env}) as url:
        for stream in (False, True):
            mark = uuid.uuid4().hex[:12]
            assert ask(url, "plain", mark, stream=stream) == answer_text(mark)


def test_generation_and_probes_go_through_the_proxy(hostile: HostileUpstream, tmp_path: Path) -> None:
    with ForwardProxy().running() as proxy:
        serve_through(hostile, tmp_path, {"HTTP_PROXY": f"http://team:s3cret@127.0.0.1:{proxy.port}",
                                          "NO_PROXY": ""})
    assert ("POST", f"{hostile.url}/chat/completions") in proxy.requests
    assert ("GET", f"{hostile.url}/models") in proxy.requests  # /ready's health probe
    assert {m for m, _ in proxy.requests} == {"GET", "POST"}
    assert set(proxy.authorizations) == {"Basic " + base64.b64encode(b"team:s3cret").decode()}


@pytest.mark.parametrize("how", ["no_proxy", "trust_env_false"])
def test_no_proxy_and_trust_env_false_go_direct(hostile: HostileUpstream, tmp_path: Path,
                                                how: str) -> None:
    with ForwardProxy().running() as proxy:
        env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1" if how == "no_proxy" else ""}
        serve_through(hostile, tmp_path, env,
                      **({"trust_env": False} if how == "trust_env_false" else {}))
    assert proxy.requests == []


def test_an_unsupported_proxy_is_refused_at_start(hostile: HostileUpstream, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not supported"):
        serve_through(hostile, tmp_path, {"HTTP_PROXY": "socks5://127.0.0.1:1", "NO_PROXY": ""})
