"""The committed dashboards are the generator's output; compose.yaml and the configs it
mounts are valid."""

from __future__ import annotations

from pathlib import Path

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
            assert p.description and p.queries and all("gateway_" in q.expr for q in p.queries)


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
