"""A gateway on the demo model with the reliability knobs turned down for tests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server import demo_config, running_gateway

FUZZ_KEY = "sk-fuzz-tenant"
METRICS_KEY = "sk-metrics-scraper"
ENV = {"GATEWAY_ADMIN_KEY": "sk-admin", "GATEWAY_METRICS_KEY": METRICS_KEY}


def reliability_config(model_dir: Path) -> dict[str, Any]:
    cfg = demo_config(model_dir)
    cfg["server"].update(body_timeout_s=1.5, metrics_api_key_env="GATEWAY_METRICS_KEY",
                         shutdown_grace_s=3)
    # The schemathesis tenant: a small KV share keeps every accepted request short.
    cfg["tenants"].append({"name": "fuzz", "models": ["demo"],
                           "api_key_sha256": [hashlib.sha256(FUZZ_KEY.encode()).hexdigest()],
                           "limits": {"max_kv_share": 0.005}})
    return cfg


@pytest.fixture(scope="session")
def rel_gateway(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the base URL (…/v1); the process log is in the fixture's tmp dir."""
    with running_gateway(reliability_config(demo_model), tmp_path_factory.mktemp("rel"),
                         env=ENV) as url:
        yield url
