"""The `vllm` kind against a real vLLM CPU server (marker `vllm`; `make test-vllm`).

vLLM runs from its own venv (.venv-vllm, `make vllm-venv`) on the demo model with LoRA
enabled and no adapters preloaded; a real gateway sits in front with a vLLM tier that
degrades to the local engine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server import ACME_SHA, GLOBEX_SHA, free_port, reservations, running_gateway

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[3]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PROMPT = [{"role": "user", "content": "How do I get a refund for my order?"}]
NOSY = "sk-nosy"  # a third tenant that may not degrade
VLLM_LOG: Path | None = None  # the shared vLLM server's log (set by the fixture)


@pytest.fixture(scope="module")
def vllm_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    if not VLLM_PY.exists():
        pytest.fail("the vLLM CPU venv is missing: run `make vllm-venv` (make test-vllm does)")
    port = free_port()
    global VLLM_LOG
    log = VLLM_LOG = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_model),
             "--served-model-name", "demo", "--host", "127.0.0.1", "--port", str(port),
             "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-model-len", "2048",
             # vLLM 0.32 refuses a required or named tool_choice without a tool-call parser
             # (enabled only with auto tool choice); hermes reads <tool_call>{...}</tool_call>,
             # the demo template's own format
             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not up in 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"{url}/v1", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tiered_config(vllm_url: str, demo_model: Path, kv_budget: str = "1GiB") -> dict[str, Any]:
    adapters = {"demo-large": None, "demo": None}
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
        "backends": {
            "big": {"kind": "vllm", "url": vllm_url, "model_dir": str(demo_model),
                    "adapters_dir": str(demo_model / "adapters"), "adapter_budget_bytes": "1MiB",
                    "kv_budget_bytes": kv_budget, "read_timeout": 120},
            "small": {"kind": "local", "model": str(demo_model), "kv_cache_bytes": "32MiB",
                      "adapters_dir": str(demo_model / "adapters")},
        },
        "models": [{"name": "demo-large", "backend": "big", "degrade_to": "demo"},
                   {"name": "demo", "backend": "small"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": list(adapters),
             "adapters": {"demo-large": "acme-support", "demo": "acme-support"}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": list(adapters),
             "adapters": {"demo-large": "globex-legal", "demo": "globex-legal"}},
            {"name": "nosy", "api_keys_env": "NOSY_KEYS", "models": list(adapters),
             "allow_degrade": False},
        ],
        "policies": ["adapter_selection", "context_trim", "degrade", "admission"],
        "policy_options": {"degrade": {"wait_threshold_s": 0.2}},
    }


@pytest.fixture(scope="module")
def tiered(vllm_server: tuple[str, Any], demo_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_gateway(tiered_config(vllm_server[0], demo_model), tmp_path_factory.mktemp("gw"),
                         env={"GATEWAY_ADMIN_KEY": "sk-admin", "NOSY_KEYS": NOSY}) as url:
        yield url


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def greedy(url: str, key: str, model: str, max_tokens: int = 24) -> Any:
    return sdk(url, key).chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, temperature=0, max_tokens=max_tokens)


def large_but_short(url: str, key: str) -> Any:
    """Asks for 600 tokens (what admission reserves) and stops at the first space."""
    return sdk(url, key).chat.completions.with_raw_response.create(
        model="demo-large", messages=PROMPT, temperature=0, max_tokens=600, stop=[" "])


def vllm_models(vllm_url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_url}/models").json()["data"]}


def test_adapters_load_on_first_use_and_are_reused(tiered: str, vllm_server: tuple[str, Any]) -> None:
    vllm_url = vllm_server[0]
    assert vllm_models(vllm_url) == {"demo"}  # nothing preloaded
    r = greedy(tiered, "sk-demo-acme", "demo-large")
    assert r.headers["x-gateway-adapter"] == "acme-support"
    assert vllm_models(vllm_url) == {"demo", "acme-support"}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda k: greedy(tiered, k, "demo-large"), ["sk-demo-acme", "sk-demo-globex"] * 3))
    assert vllm_models(vllm_url) == {"demo", "acme-support", "globex-legal"}
    stats = httpx.get(tiered.removesuffix("/v1") + "/debug/memory",
                      headers={"authorization": "Bearer sk-admin"}).json()
    big = stats["backends"]["big"]
    assert sorted(big["memory"]["adapters"]) == ["acme-support", "globex-legal"]


def test_vllm_tier_equals_local_engine(tiered: str) -> None:
    for key in ("sk-demo-acme", "sk-demo-globex", NOSY):
        via_vllm = greedy(tiered, key, "demo-large", 32).parse()
        local = greedy(tiered, key, "demo", 32).parse()
        assert via_vllm.model == "demo-large" and local.model == "demo"
        assert via_vllm.choices[0].message.content == local.choices[0].message.content, key
        assert via_vllm.usage.prompt_tokens == local.usage.prompt_tokens


def test_streaming_through_vllm(tiered: str) -> None:
    parts = list(sdk(tiered, "sk-demo-globex").chat.completions.create(
        model="demo-large", messages=PROMPT, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == greedy(tiered, "sk-demo-globex", "demo-large").parse().choices[0].message.content
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens > 0


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """vLLM stopped (SIGSTOP) for the block: what it serves stays in flight however fast it
    would have finished, so a test does not race its generation speed."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def test_saturated_vllm_tier_degrades_to_local(vllm_server: tuple[str, Any], demo_model: Path,
                                               tmp_path: Path) -> None:
    # A KV budget for about one long request: the second concurrent one cannot be admitted.
    vllm_url, proc = vllm_server
    cfg = tiered_config(vllm_url, demo_model, kv_budget="1200KiB")
    with running_gateway(cfg, tmp_path, env={"GATEWAY_ADMIN_KEY": "sk-admin", "NOSY_KEYS": NOSY}) as url, \
            logs_on_failure(tmp_path / "gateway.log"):
        assert greedy(url, "sk-demo-acme", "demo-large", 4).headers["x-gateway-adapter"] == "acme-support"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with frozen(proc):
                # The long request is admitted (its KV reserved) and dispatched to a vLLM that
                # cannot answer yet: it holds the tier's budget until vLLM is let go.
                long = pool.submit(lambda: sdk(url, "sk-demo-acme").chat.completions.create(
                    model="demo-large", messages=PROMPT, max_tokens=1000, stream=True,
                    temperature=0, extra_body={"ignore_eos": True}))
                deadline = time.monotonic() + 30
                while reservations(url)["backends"].get("big", {}).get("reserved_bytes", 0) == 0:
                    if long.done():  # answered (or refused) without holding anything: say how
                        pytest.fail(f"the long request ended before vLLM was let go: {long.result()!r}")
                    assert time.monotonic() < deadline, "the long request was never admitted"
                    time.sleep(0.05)
                # 600 tokens reserved, more than the tier has left: served by the local tier.
                r = large_but_short(url, "sk-demo-globex")
                assert r.headers["x-gateway-degraded-from"] == "demo-large"
                assert r.parse().model == "demo"
                with pytest.raises(openai.APIStatusError) as info:  # may not degrade
                    large_but_short(url, NOSY)
                assert info.value.status_code == 503
                assert info.value.response.headers.get("retry-after")
            stream = long.result(timeout=120)
            first = next(iter(stream))  # vLLM serves the long request once let go
            assert first.model == "demo-large"
            stream.close()


@contextlib.contextmanager
def logs_on_failure(*logs: Path) -> Iterator[None]:
    """On a failure, the tails of the gateway's and vLLM's logs go to the test's output."""
    try:
        yield
    except BaseException:
        for log in (*logs, VLLM_LOG):
            if log is not None and log.exists():
                print(f"---- {log} (last 60 lines) ----")
                print("\n".join(log.read_text(errors="replace").splitlines()[-60:]))
        raise


# ---- fidelity: tool calls and structured outputs pass through vLLM ---------------

# The demo model, greedy inside vLLM's flexible-whitespace JSON, writes newlines until its
# limit; the client's frequency_penalty (passed through as sent) ends the run of them.
UNSTICK = {"temperature": 0, "frequency_penalty": 2.0, "max_tokens": 120}
WEATHER = {"type": "function", "function": {  # strict: vLLM then constrains the arguments too
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 10}}}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_tool_calls_pass_through(tiered: str, choice: Any) -> None:
    """With tool_choice required or named vLLM constrains the call itself (its structural
    tags; the hermes parser named at its start reads the demo template's format back); the
    gateway passes its tool_calls to the SDK as vLLM sent them."""
    import json

    client = sdk(tiered, NOSY)  # no adapter: the base model
    r = client.chat.completions.create(
        model="demo-large", messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER], tool_choice=choice, **UNSTICK)  # type: ignore[list-item,arg-type]
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert isinstance(args["city"], str) and len(args["city"]) <= 10
    assert r.model == "demo-large" and calls[0].id
    with client.chat.completions.stream(
            model="demo-large", messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER], tool_choice=choice, **UNSTICK) as stream:  # type: ignore[list-item,arg-type]
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert streamed and json.loads(streamed[0].function.arguments) == args  # type: ignore[union-attr]


def test_structured_output_passes_through_and_parses(tiered: str) -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        reason: str = Field(max_length=16)

    done = sdk(tiered, NOSY).chat.completions.parse(
        model="demo-large", messages=[{"role": "user", "content": "Can I return shoes?"}],
        response_format=Verdict, **UNSTICK)
    assert isinstance(done.choices[0].message.parsed, Verdict)


def test_logprobs_and_extensions_pass_through(tiered: str) -> None:
    client = sdk(tiered, NOSY)
    r = client.chat.completions.create(model="demo-large", messages=PROMPT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content and len(lp.content[0].top_logprobs) == 2
    top1 = client.chat.completions.create(model="demo-large", messages=PROMPT, max_tokens=6,
                                          temperature=1.5, seed=5, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == r.choices[0].message.content  # vLLM took top_k


def test_responses_pass_through_to_vllm(tiered: str) -> None:
    """vLLM serves /v1/responses: the gateway's vllm kind forwards it (responses_api native)
    and the answer's id is vLLM's own."""
    r = sdk(tiered, NOSY).responses.create(model="demo-large", input="Hello!",
                                           max_output_tokens=10, temperature=0)
    assert r.id.startswith("resp_") and r.model == "demo-large" and r.output_text


def test_vllm_dying_mid_stream(vllm_server: tuple[str, subprocess.Popen[bytes]], demo_model: Path,
                               tmp_path: Path) -> None:
    """Runs last in this module: it kills the shared vLLM server."""
    vllm_url, proc = vllm_server
    cfg = tiered_config(vllm_url, demo_model)
    with running_gateway(cfg, tmp_path, env={"GATEWAY_ADMIN_KEY": "sk-admin", "NOSY_KEYS": NOSY}) as url, \
            logs_on_failure(tmp_path / "gateway.log"):
        stream = sdk(url, "sk-demo-acme").chat.completions.create(
            model="demo-large", messages=PROMPT, max_tokens=1500, stream=True, temperature=0,
            extra_body={"ignore_eos": True})
        seen: list[tuple[str, str | None, str | None]] = []
        with pytest.raises(openai.APIError):
            for part in stream:
                choice = part.choices[0] if part.choices else None
                seen.append((part.model, choice.delta.content if choice else None,
                             choice.finish_reason if choice else None))
                if len(seen) == 3:  # vLLM has 1,500 tokens to go: it dies mid-stream
                    os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the stream ended without an error after {len(seen)} chunks: "
                        f"first {seen[:4]}, last {seen[-2:]}")
        assert len(seen) >= 3 and {m for m, _, _ in seen} == {"demo-large"}, seen[:4]
        root = url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200
        local = greedy(url, "sk-demo-acme", "demo")  # the gateway and its local tier still serve
        assert local.parse().choices[0].message.content
