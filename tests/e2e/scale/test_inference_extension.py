"""An `openai` backend pointed at a Gateway API Inference Extension's gateway passes the
tenant as x-gateway-inference-fairness-id and its inference_objective as
x-gateway-inference-objective; a recording upstream sees them (and a plain one does not)."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.e2e.scale.conftest import ENV
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.server import ACME_SHA, GLOBEX_SHA, running_gateway


def test_fairness_and_objective_headers_reach_the_inference_gateway(tmp_path: Path) -> None:
    with CountingUpstream().running() as up:
        cfg = {
            "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY"},
            "backends": {"pool": {"kind": "openai", "url": up.url, "inference_extension": True},
                         "plain": {"kind": "openai", "url": up.url}},
            "models": [{"name": "large", "backend": "pool"}, {"name": "other", "backend": "plain"}],
            "tenants": [
                {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["large", "other"],
                 "inference_objective": "premium"},
                {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["large"]},
            ],
        }
        with running_gateway(cfg, tmp_path, env=ENV) as url:
            for key, model in (("sk-demo-acme", "large"), ("sk-demo-globex", "large"),
                               ("sk-demo-acme", "other")):
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}])
    acme, globex, plain = up.headers
    assert acme["x-gateway-inference-fairness-id"] == "acme"
    assert acme["x-gateway-inference-objective"] == "premium"
    assert globex["x-gateway-inference-fairness-id"] == "globex"
    assert "x-gateway-inference-objective" not in globex  # no objective configured
    assert not any(k.startswith("x-gateway-inference") for k in plain)
