"""Tenants on one base model with their own adapters: under adapter churn (a cache with bytes
for 3 of 4 adapters and 2 LoRA slots: evictions to disk, demotions to host) every greedy
answer equals the tenant's solo answer; a tenant never sees, names or uses another tenant's
model or adapter; a truncated or missing adapter fails only its own tenant's requests, with a
clear OpenAI-shaped error naming it, and the gateway stays ready."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file, save_file

from backends.hf.safetensors import adapter_bytes
from tests.server import gateway_process

GOOD = {"acme": "acme-support", "globex": "globex-legal", "initech": "acme-x1.5",
        "umbrella": "acme-neg"}
BROKEN = {"hooli": "hooli-truncated", "piper": "piper-missing"}
PROMPTS = ("How do I get a refund for my order?", "Summarise the termination clause.")
ADMIN = "sk-admin-iso"


def key(tenant: str) -> str:
    return f"sk-iso-{tenant}"


def _scaled(src: Path, dst: Path, factor: float) -> None:
    shutil.copytree(src, dst)
    weights = load_file(src / "adapter_model.safetensors")
    save_file({k: (v * factor if "lora_B" in k else v).contiguous() for k, v in weights.items()},
              str(dst / "adapter_model.safetensors"))


def build_model(dst: Path, demo: Path) -> Path:
    """A copy of the demo with 4 good adapters, one truncated and one without weights."""
    shutil.copytree(demo, dst)
    ad = dst / "adapters"
    _scaled(ad / "acme-support", ad / "acme-x1.5", 1.5)
    _scaled(ad / "acme-support", ad / "acme-neg", -1.0)
    shutil.copytree(ad / "globex-legal", ad / BROKEN["hooli"])
    f = ad / BROKEN["hooli"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # header intact, tensors cut
    shutil.copytree(ad / "globex-legal", ad / BROKEN["piper"])
    (ad / BROKEN["piper"] / "adapter_model.safetensors").unlink()
    return dst


def churn_config(model: Path) -> dict[str, Any]:
    one = adapter_bytes(model / "adapters" / "acme-support", 4)  # float32
    tenants = []
    for t, adapter in {**GOOD, **BROKEN}.items():
        private = f"{t}-private"
        tenants.append({"name": t, "models": ["demo", private],
                        "api_key_sha256": [hashlib.sha256(key(t).encode()).hexdigest()],
                        "adapters": {"demo": adapter, private: adapter}})
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
        "backends": {"local": {"kind": "local", "model": str(model), "kv_cache_bytes": "32MiB",
                               "adapters_dir": str(model / "adapters"),
                               "adapter_cache_bytes": int(one * 3.5), "max_loras": 2}},
        "models": [{"name": "demo", "backend": "local"},
                   *({"name": f"{t}-private", "backend": "local"} for t in (*GOOD, *BROKEN))],
        "tenants": tenants,
    }


@pytest.fixture(scope="module")
def churn(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("churn")
    model = build_model(tmp / "model", demo_model)
    with gateway_process(churn_config(model), tmp, env={"GATEWAY_ADMIN_KEY": ADMIN}) as (url, _):
        yield url, tmp


def chat(url: str, tenant: str, prompt: str, stream: bool = False, model: str = "demo",
         api_key: str | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": 32, "stream": stream}
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {api_key or key(tenant)}"})


def text_of(r: httpx.Response, stream: bool) -> str:
    assert r.status_code == 200, r.text
    if not stream:
        return str(r.json()["choices"][0]["message"]["content"])
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])


def admin(url: str) -> dict[str, Any]:
    r = httpx.get(url.removesuffix("/v1") + "/debug/memory", timeout=10,
                  headers={"authorization": f"Bearer {ADMIN}"})
    r.raise_for_status()
    return dict(r.json())


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return dict(body["error"])


def test_answers_under_adapter_churn_equal_solo_answers(churn: tuple[str, Path]) -> None:
    url, _ = churn
    solo = {(t, p): text_of(chat(url, t, p), False) for t in GOOD for p in PROMPTS}
    for p in PROMPTS:  # the four adapters answer differently, so a mix-up would show
        assert len({solo[(t, p)] for t in GOOD}) == len(GOOD), solo
    before = admin(url)["backends"]["local"]["stats"]
    jobs = [(t, p, s) for _ in range(3) for t in GOOD for p in PROMPTS for s in (False, True)]

    def one(job: tuple[str, str, bool]) -> tuple[tuple[str, str], str]:
        t, p, s = job
        return (t, p), text_of(chat(url, t, p, stream=s), s)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    wrong = [(k, text) for k, text in got if text != solo[k]]
    assert not wrong, wrong
    after = admin(url)["backends"]["local"]
    # the cache really churned (3 of 4 fit, in 2 slots), and holds nothing once it is over
    assert after["stats"]["adapter_evictions"] > before["adapter_evictions"]
    assert after["stats"]["adapters_pinned"] == {}
    assert sum(after["memory"]["adapters"].values()) <= after["capacity"]["adapter_budget_bytes"]


def test_a_tenant_sees_and_uses_only_its_own(churn: tuple[str, Path]) -> None:
    url, _ = churn
    for t in GOOD:
        r = httpx.get(f"{url}/models", headers={"authorization": f"Bearer {key(t)}"}, timeout=10)
        assert sorted(m["id"] for m in r.json()["data"]) == sorted(["demo", f"{t}-private"])
    other = chat(url, "acme", PROMPTS[0], model="globex-private")
    assert other.status_code == 404 and error_of(other)["code"] == "model_not_found"
    r = httpx.get(f"{url}/models/globex-private", timeout=10,
                  headers={"authorization": f"Bearer {key('acme')}"})
    assert r.status_code == 404
    # another tenant's adapter and an unknown one answer alike (no enumeration oracle)
    answers = set()
    for adapter in ("globex-legal", "acme-neg", BROKEN["hooli"], "no-such-adapter",
                    "../acme-support", ".."):
        r = chat(url, "acme", PROMPTS[0], model=f"demo:{adapter}")
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found", r.text
        answers.add(error_of(r)["message"].replace(adapter, "<adapter>"))
    assert len(answers) == 1, answers
    assert text_of(chat(url, "acme", PROMPTS[0], model="demo:acme-support"), False)


def test_a_broken_adapter_fails_only_its_tenant(churn: tuple[str, Path]) -> None:
    url, tmp = churn
    solo = {t: text_of(chat(url, t, PROMPTS[0]), False) for t in GOOD}
    jobs = [(t, s) for _ in range(2) for t in (*GOOD, *BROKEN) for s in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: (j, chat(url, j[0], PROMPTS[0], stream=j[1])), jobs))
    for (t, s), r in got:
        if t in GOOD:
            assert text_of(r, s) == solo[t]
            continue
        assert 400 <= r.status_code < 600 and r.headers["content-type"].startswith(
            "application/json"), (t, r.status_code, r.text)
        err = error_of(r)
        assert BROKEN[t] in err["message"] and err["code"] == "adapter_invalid", err
        assert str(tmp) not in r.text  # no server paths
        assert "Error" not in r.text and "/" not in err["message"]  # nor the loader's words
    assert httpx.get(url.removesuffix("/v1") + "/ready", timeout=10).status_code == 200
    end = admin(url)
    assert end["reservations"]["reserved_bytes"] == 0
    assert end["backends"]["local"]["stats"]["adapters_pinned"] == {}
    assert text_of(chat(url, "globex", PROMPTS[1]), False)
