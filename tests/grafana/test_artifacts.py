"""The committed dashboards are the generator's output; compose.yaml and the configs it
mounts are valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import load_settings
from grafana.generate import OUT, render
from grafana.panels import DASHBOARDS
from tests.deploy.test_compose import compose

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_committed_dashboard_matches_generator(uid: str) -> None:
    committed = (OUT / f"{uid}.json").read_text()
    assert committed == render(uid), f"run `make dashboards` and commit grafana/dashboards/{uid}.json"


def test_every_panel_says_what_it_shows() -> None:
    for _title, panels in DASHBOARDS.values():
        titles = [p.title for p in panels]
        assert len(titles) == len(set(titles))
        for p in panels:
            assert p.description and p.queries
            for q in p.queries:  # our metrics, or the standard process ones, never unfiltered
                assert "gateway_" in q.expr or "process_" in q.expr, q.expr
                assert 'job=~"$job"' in q.expr and 'instance=~"$instance"' in q.expr, q.expr


def grafana_import(text: str, answers: dict[str, str]) -> dict[str, Any]:
    """What Grafana's dashboard import does with a shared dashboard: each `__inputs` entry is
    asked for, and `${NAME}` replaced by the answer throughout the JSON."""
    board = json.loads(text)
    for item in board.get("__inputs", []):
        text = text.replace("${" + item["name"] + "}", answers[item["name"]])
    imported: dict[str, Any] = json.loads(text)
    return imported


def datasources(node: Any) -> list[dict[str, Any]]:
    """Every `datasource` reference anywhere in a dashboard."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                found.append(value)
            found += datasources(value)
    elif isinstance(node, list):
        for item in node:
            found += datasources(item)
    return found


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_imports_with_another_datasource_uid(uid: str) -> None:
    text = (OUT / f"{uid}.json").read_text()
    board = json.loads(text)
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    assert board["schemaVersion"] >= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "job", "instance", "tenant", "model"}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("job", "instance", "tenant", "model"):
        assert variables[name]["includeAll"] and variables[name]["multi"]
    # every panel, target and variable query reads the datasource variable; no uid is fixed
    refs = datasources(board)
    assert len(refs) > len(board["panels"])
    assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), refs
    imported = grafana_import(text, {"DS_PROMETHEUS": "their-prom-7f3a"})
    current = next(v for v in imported["templating"]["list"] if v["name"] == "datasource")
    assert current["current"]["value"] == "their-prom-7f3a"
    assert "${DS_PROMETHEUS}" not in json.dumps(imported)
    assert all(r["uid"] == "${datasource}" for r in datasources(imported))


def test_compose_config_is_valid() -> None:
    services = compose()  # `docker-compose config` passes
    assert {"gateway", "vllm", "prometheus", "grafana", "otel-collector", "jaeger"} <= set(services)
    vllm = services["vllm"]
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]}
    assert targets == {"gateway:8000", "vllm:8001"}
    assert load_settings(ROOT / "deploy" / "gateway.yaml").telemetry.otlp_endpoint
