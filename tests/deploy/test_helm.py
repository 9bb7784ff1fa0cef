"""The Helm chart (deploy/helm/memgate): rendered and linted by Helm 4's own Go code (the
helm-python-sdk wheel carries it as libhelm_c), for the default values and for every option
on; each manifest validated against the Kubernetes schemas (kubernetes-validate; the
ServiceMonitor, whose CRD schema it lacks, by explicit assertions); and the parts that matter
asserted: probes, security context, tenant keys as Secret files, drain timing, the gateway
config it renders loading with our own settings loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.settings import parse_settings

helm = pytest.importorskip("helm_python.chart", reason="helm-python-sdk (dev extra, linux x86_64)")
helm_errors = pytest.importorskip("helm_python.errors")

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "memgate"
KUBE = "1.30.0"
FULL: dict[str, Any] = {
    "image": {"repository": "registry.example/memgate", "variant": "full", "tag": "1.2.3",
              "pullPolicy": "Always"},
    "workers": 4,
    "tenantKeys": {"keys": {"acme": "sk-a,sk-b"}},
    "adminKey": {"existingSecret": "memgate-admin"},
    "redis": {"enabled": True, "url": "rediss://:pw@redis.example:6380/0", "onUnavailable": "reject"},
    "autoscaling": {"enabled": True, "maxReplicas": 6},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    "modelsVolume": {"persistentVolumeClaim": {"claimName": "models"}},
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema(chart.merge_values(values))
        files = chart.render(values, name="gw", namespace="ai", is_install=True)
    finally:
        chart.close()
    docs = [d for text in files.values() for d in yaml.safe_load_all(text) if d]
    return docs


def kind(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == name]


@pytest.mark.parametrize("values", [None, FULL], ids=["default", "full"])
def test_the_chart_lints_renders_and_validates(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2]
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"]
    if values is FULL:
        expected = sorted([*expected, "HorizontalPodAutoscaler", "Secret", "Secret", "ServiceMonitor",
                           "PrometheusRule"])
    assert kinds == expected
    for doc in docs:
        if doc["kind"] not in ("ServiceMonitor", "PrometheusRule"):  # CRDs: asserted below
            kubernetes_validate.validate(doc, KUBE, strict=True)


def test_probes_security_and_drain_timing() -> None:
    (dep,) = kind(render(FULL), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["memory"]
    assert c["args"][-2:] == ["--workers", "4"] and c["image"] == "registry.example/memgate:1.2.3-full"
    # the pod outlives preStop + the gateway's drain: grace = sleep + shutdown_grace_s + 5
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 10 + 5
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # the only writable path


def test_tenant_keys_are_secret_files_and_the_config_loads(tmp_path: Path) -> None:
    docs = render(FULL)
    (dep,) = kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert "MEMGATE_REDIS_URL" in env and "secretKeyRef" in env["MEMGATE_REDIS_URL"]["valueFrom"]
    assert not any("KEYS" in name for name in env)  # no tenant key in the environment
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tenant-keys")
    vol = next(v for v in pod["volumes"] if v["name"] == "tenant-keys")
    assert mount["mountPath"] == "/etc/memgate/keys" and mount["readOnly"] is True
    secrets = {s["metadata"]["name"]: s for s in kind(docs, "Secret")}
    assert secrets[vol["secret"]["secretName"]]["stringData"] == {"acme": "sk-a,sk-b"}
    (cm,) = kind(docs, "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["gateway.yaml"])
    for tenant in cfg["tenants"]:
        assert tenant["api_keys_file"].startswith("/etc/memgate/keys/")
    assert cfg["shared_state"]["redis_url_env"] == "MEMGATE_REDIS_URL"
    assert cfg["shared_state"]["on_unavailable"] == "reject"
    # the rendered config is one our loader accepts; its keys come from the mounted file
    keys = tmp_path / "acme"
    keys.write_text("sk-a,sk-b")
    cfg["tenants"][0]["api_keys_file"] = str(keys)
    settings = parse_settings(cfg)
    assert settings.shared_state is not None and len(settings.tenants[0].key_hashes()) == 2
    # and one the committed JSON Schema accepts (an editor's or CI's check of a values file)
    schema = json.loads((CHART.parents[2] / "docs" / "config.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(cfg)


def test_the_alert_rules_ship_as_a_prometheus_rule() -> None:
    source = CHART.parents[2] / "grafana" / "alerts" / "memgate.rules.yml"
    copy = CHART / "files" / "memgate.rules.yml"
    assert copy.read_bytes() == source.read_bytes(), "cp grafana/alerts/memgate.rules.yml " + str(copy)
    (rule,) = kind(render(FULL), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    groups = yaml.safe_load(source.read_text())["groups"]
    assert rule["spec"]["groups"] == groups and sum(len(g["rules"]) for g in groups) >= 10


def test_service_monitor_scrapes_the_service() -> None:
    docs = render(FULL)
    (sm,) = kind(docs, "ServiceMonitor")
    (svc,) = kind(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["interval"].endswith("s")


@pytest.mark.parametrize(("bad", "where"), [
    ({"image": {"repository": "x", "variant": "huge"}}, "/image/variant"),
    ({"redis": {"enabled": True, "url": "http://not-redis"}}, "/redis/url"),
    ({"config": {"backends": {}, "models": [], "tenants": [{"name": "a", "api_keys_env": "K"}]}},
     "/config/tenants/0/api_keys_env"),
    ({"config": {"backends": {}, "models": [], "tenants": [], "shared_state": {}}},
     "/config/shared_state"),
])
def test_values_schema_refuses_bad_values(bad: dict[str, Any], where: str) -> None:
    chart = helm.Chart.load(CHART)
    try:
        with pytest.raises(helm_errors.HelmValuesError, match=f"at '{where}'"):
            chart.validate_schema(chart.merge_values(bad))
    finally:
        chart.close()
