"""compose.yaml: `docker-compose config` passes, the model name the gateway sends is the one
vLLM serves (it was not: every `large` request was a 404), and the gateway runs the image the
Helm chart runs (the Dockerfile's targets are the chart's image variants)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from gateway.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    binary = shutil.which("docker-compose")
    if binary is None:
        raise RuntimeError("docker-compose is missing: run `make obs-tools` (apt-get)")
    out = subprocess.run([binary, "-f", str(ROOT / "compose.yaml"), "config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout)["services"])


def test_the_gateway_sends_the_model_name_vllm_serves() -> None:
    services = compose()
    command = services["vllm"]["command"]
    served = command[command.index("--served-model-name") + 1]
    settings = load_settings(ROOT / "deploy" / "gateway.yaml")
    model = settings.model("large")
    assert model is not None
    upstream = settings.backends[model.backend]
    assert upstream.kind == "vllm" and upstream.config.model == served  # type: ignore[attr-defined]


def test_compose_and_the_chart_use_the_dockerfile_targets() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.M))
    assert {"slim", "full"} <= targets
    gateway = compose()["gateway"]
    assert gateway["build"]["target"] == "full" and gateway["image"].endswith("-full")
    schema = (ROOT / "deploy" / "helm" / "memgate" / "values.schema.json").read_text()
    assert '"variant": {"enum": ["slim", "full"]}' in schema
