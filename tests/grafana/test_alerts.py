"""The alert rules (grafana/alerts/) are valid Prometheus rule files, each rule has a promtool
unit test that makes it fire, and the tests pass (`promtool test rules`, Debian's prometheus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "grafana" / "alerts"
RULES = sorted(ALERTS.glob("*.rules.yml"))
TESTS = sorted((ALERTS / "tests").glob("*.yml"))


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        raise RuntimeError("promtool is missing: run `make obs-tools` (apt-get install prometheus)")
    return binary


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=ALERTS, capture_output=True, text=True,
                          timeout=120)


def test_rule_files_are_valid() -> None:
    assert RULES
    out = run("check", "rules", *map(str, RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_pass() -> None:
    assert TESTS
    out = run("test", "rules", *map(str, TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_has_a_test_that_fires_it_and_one_that_does_not() -> None:
    alerts = {r["alert"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    for f in TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "no alert rules found"
    assert alerts <= fired, f"alerts no test makes fire: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts no test holds quiet (before `for`): {sorted(alerts - quiet)}"


def test_prometheus_in_compose_loads_the_rules() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./grafana/alerts:/etc/prometheus/rules") for m in mounts), mounts
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.rules.yml"]
