"""The `openai` kind, with a second real gateway process as its upstream."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import ACME_SHA, demo_config, free_port, gateway_process, running_gateway

PROMPT = [{"role": "user", "content": "What are your opening hours?"}]


def front_config(upstream: str) -> dict[str, Any]:
    return {
        "backends": {"up": {"kind": "openai", "url": upstream, "api_key_env": "UPSTREAM_KEY",
                            "read_timeout": 60}},
        "models": [{"name": "demo", "backend": "up"}],
        "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["demo"]}],
    }


@pytest.fixture(scope="module")
def chain(demo_gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(front_config(demo_gateway), tmp_path_factory.mktemp("front"),
                         env={"UPSTREAM_KEY": "sk-demo-acme"}) as url:
        yield url


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-demo-acme", max_retries=0, timeout=60)


def test_forwarded_answers_equal_direct(chain: str, demo_gateway: str) -> None:
    kw: dict[str, Any] = {"model": "demo", "messages": PROMPT, "temperature": 0, "max_tokens": 20}
    direct = _sdk(demo_gateway).chat.completions.create(**kw)
    via = _sdk(chain).chat.completions.create(**kw)
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage == direct.usage
    assert via.choices[0].finish_reason == direct.choices[0].finish_reason
    parts = list(_sdk(chain).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == direct.choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == direct.usage.completion_tokens  # type: ignore[union-attr]
    ckw: dict[str, Any] = {"model": "demo", "prompt": "Opening hours are", "temperature": 0, "max_tokens": 10}
    assert (_sdk(chain).completions.create(**ckw).choices[0].text
            == _sdk(demo_gateway).completions.create(**ckw).choices[0].text)


def test_upstream_client_errors_pass_through(chain: str) -> None:
    long = [{"role": "user", "content": "hours " * 3000}]
    with pytest.raises(openai.BadRequestError):
        _sdk(chain).chat.completions.create(model="demo", messages=long, max_tokens=8)


def test_unreachable_upstream_is_502(tmp_path: Path) -> None:
    cfg = front_config(f"http://127.0.0.1:{free_port()}/v1")
    with running_gateway(cfg, tmp_path, env={"UPSTREAM_KEY": "sk-x"}, ready_path="/health") as url:
        assert httpx.get(url.removesuffix("/v1") + "/ready").status_code == 503
        with pytest.raises(openai.APIStatusError) as info:
            _sdk(url).chat.completions.create(model="demo", messages=PROMPT)
        assert info.value.status_code == 502
        assert info.value.response.json()["error"]["code"] == "upstream_unreachable"
        assert "sk-x" not in info.value.response.text


def test_upstream_dying_mid_stream_gives_an_error_event(demo_model: Path, tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "front").mkdir()
    with (
        gateway_process(demo_config(demo_model), tmp_path / "up") as (upstream, proc),
        running_gateway(front_config(upstream), tmp_path / "front",
                        env={"UPSTREAM_KEY": "sk-demo-acme"}) as url,
    ):
        stream = _sdk(url).chat.completions.create(
            model="demo", messages=PROMPT, max_tokens=1000, stream=True,
            extra_body={"ignore_eos": True})
        got = 0
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                got += 1
                if got == 3:
                    proc.kill()
        assert got >= 3
        assert "upstream" in str(info.value.message)
        # the front gateway itself is fine; its upstream is out of rotation (503) or down (502)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with pytest.raises(openai.APIStatusError) as again:
                _sdk(url).chat.completions.create(model="demo", messages=PROMPT)
            if again.value.status_code in (502, 503):
                break
        assert again.value.status_code in (502, 503)
        assert again.value.response.json()["error"]["code"] in (
            "upstream_unavailable", "upstream_unreachable")
