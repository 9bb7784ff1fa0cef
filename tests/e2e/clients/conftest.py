"""The gateway two ways for the real clients: the local demo (the embedded engine, grammar-
constrained) and a recording upstream behind the `openai` kind (pass-through). Every client
test runs against both (`target`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.recording_upstream import RecordingUpstream
from tests.server import ACME_SHA, running_gateway

# No client may reach the network: the Agents SDK's trace export stays off, and nothing here
# asks tiktoken for an encoding (it would download one).
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    local: bool


@pytest.fixture(scope="session")
def recording_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RecordingUpstream]]:
    with RecordingUpstream().running() as up:
        cfg = {"backends": {"up": {"kind": "openai", "url": up.url}},
               "models": [{"name": "big", "backend": "up"}],
               "tenants": [{"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["big"]}]}
        with running_gateway(cfg, tmp_path_factory.mktemp("recording")) as url:
            yield url, up


@pytest.fixture(params=["local", "upstream"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "local":
        return Target(request.getfixturevalue("demo_gateway"), "demo", True)
    url, _ = request.getfixturevalue("recording_gateway")
    return Target(url, "big", False)
