"""A real Prometheus scrapes a live gateway under a short load; every panel query of every
dashboard, with its variables substituted as a user picks them, must then return data. Panels whose data needs something this machine or the
project does not have yet are named in PENDING with the reason, and reported as warnings."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.observability.prom import instant, running_prometheus, wait_for_targets_up
from tests.server import demo_config, free_port, running_gateway

ROOT = Path(__file__).resolve().parents[3]
LIMITED_KEY = "sk-obs-limited"
LONG_CHAT = [{"role": "user" if i % 2 == 0 else "assistant",
              "content": "Tell me about refunds and orders and shipping. " * 12} for i in range(41)]


def gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


# panel title -> why it may have no data here (checked by name; anything else must have data)
PENDING: dict[str, str] = {}
if not gpu_present():
    PENDING["GPU memory"] = "no NVIDIA GPU/driver on this machine (NVML unavailable)"


def obs_config(model_dir: Path) -> dict[str, Any]:
    cfg = demo_config(model_dir)
    cfg["models"].append({"name": "demo-large", "backend": "local", "degrade_to": "demo"})
    # an upstream nobody listens on: its calls are retried, fail, take it out of rotation,
    # and the request falls back to demo (the upstream panels' data)
    cfg["backends"]["gone"] = {"kind": "openai", "url": f"http://127.0.0.1:{free_port()}/v1",
                               "retries": 1, "retry_backoff_s": 0.01, "cooldown_s": 300}
    cfg["models"].append({"name": "remote", "backend": "gone", "degrade_to": "demo"})
    for t in cfg["tenants"]:
        t["models"] = ["demo", "demo-large", "remote"]
    cfg["tenants"].append({
        "name": "initech", "models": ["demo"],
        "api_key_sha256": [hashlib.sha256(LIMITED_KEY.encode()).hexdigest()],
        "limits": {"requests_per_minute": 1}})
    # a rollout of demo to a second copy of its tier, every request shadowed (the Rollouts row)
    cfg["backends"]["candidate"] = dict(cfg["backends"]["local"])
    cfg["models"][0]["rollout"] = {"candidate": "candidate", "stage": "shadow",
                                   "shadow_share": 1.0, "auto": False}
    cfg["policies"] = ["adapter_selection", "context_trim", "degrade", "admission"]
    cfg["policy_options"] = {"degrade": {"high_watermark": 0.0001, "wait_threshold_s": 0.0}}
    return cfg


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):  # a row has none
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def variable_queries() -> set[str]:
    """Each dashboard variable's `label_values(SERIES, LABEL)` query."""
    out = set()
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for v in json.loads(path.read_text())["templating"]["list"]:
            if v["type"] == "query":
                out.add(v["query"])
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation of a query: $name -> its value (regex for All)."""
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${name}", value)
    return expr


def label_values(prom: str, query: str, values: dict[str, str]) -> list[str]:
    """What Grafana's `label_values(SERIES, LABEL)` returns: the series API's label values."""
    inner = substitute(query, values).removeprefix("label_values(").removesuffix(")")
    series, _, label = inner.rpartition(",")
    r = httpx.get(f"{prom}/api/v1/label/{label.strip()}/values", params={"match[]": series},
                  timeout=10)
    return list(r.json()["data"])


def load(url: str) -> None:
    def chat(key: str, model: str = "demo", stream: bool = False, **kw: Any) -> Any:
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        try:
            r = c.chat.completions.create(model=model, stream=stream, **{
                "messages": [{"role": "user", "content": "Where is my refund?"}],
                "max_tokens": 16, **kw})
            return list(r) if stream else r
        except openai.APIStatusError as exc:
            return exc.status_code

    jobs = [("sk-demo-acme", "demo", True), ("sk-demo-globex", "demo", False),
            ("sk-demo-acme", "demo-large", False), ("sk-demo-globex", "demo-large", True)] * 3
    assert not isinstance(chat("sk-demo-acme", "remote"), int)  # retried, failed, fell back
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda j: chat(j[0], j[1], j[2]), jobs))
    assert chat("sk-demo-acme", messages=LONG_CHAT, max_tokens=64) is not None  # a trim
    assert chat("sk-wrong") == 401
    assert chat("sk-demo-acme", temperature=7) == 400
    statuses = [chat(LIMITED_KEY) for _ in range(3)]
    assert 429 in statuses, statuses


@pytest.mark.timeout(120)
def test_every_dashboard_query_has_data(demo_model: Path, tmp_path: Path) -> None:
    queries = panel_queries()
    assert len(queries) > 20
    with running_gateway(obs_config(demo_model), tmp_path) as url:
        target = url.removeprefix("http://").removesuffix("/v1")
        with running_prometheus([target], tmp_path) as prom:
            wait_for_targets_up(prom, 1)
            load(url)
            # a few scrapes after the load, so that every counter has two samples for rate()
            import time

            time.sleep(3.5)
            # the variables as a user picks them: this gateway's job and instance, and All
            # (.*) tenants and models; each variable's own query must list the values
            values = {"job": "gateway", "instance": target, "__rate_interval": "1m"}
            for query in variable_queries():
                assert label_values(prom, query, {**values, "tenant": ".*", "model": ".*"}), query
            values.update(tenant=".*", model=".*")
            empty: dict[str, list[str]] = {}
            for board, title, expr in queries:
                result = instant(prom, substitute(expr, values))
                if not result:
                    empty.setdefault(title, []).append(f"[{board}] {expr}")
            scraped = httpx.get(url.removesuffix("/v1") + "/metrics").text
    missing = {t: e for t, e in empty.items() if t not in PENDING}
    assert not missing, "panels without data:\n" + json.dumps(missing, indent=1)
    pending = {t: PENDING[t] for t in empty}
    if pending:
        warnings.warn(f"panels without data, pending: {pending}", stacklevel=1)
    for secret in ("sk-demo-acme", "sk-demo-globex", LIMITED_KEY, "sk-wrong", "Bearer"):
        assert secret not in scraped
