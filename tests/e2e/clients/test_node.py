"""The openai Node SDK (zodResponseFormat, zodFunction with a recursive type) and the
Vercel AI SDK (generateObject, streamObject, a tool with toolChoice required) against the
local demo, each asserting its typed result (tests/e2e/clients/node/clients.mjs, with the
packages of its committed package-lock.json: `make node-clients` runs `npm ci`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"
CHECKS = [
    "zodResponseFormat",
    "zodFunction",
    "generateObject",
    "streamObject",
    "toolChoiceRequired",
]


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None or not (NODE_DIR / "node_modules").is_dir():
        pytest.fail(
            "Node 20 and tests/e2e/clients/node/node_modules are needed: run "
            "`make node-clients` (npm ci)"
        )
    return exe


@pytest.mark.parametrize("check", CHECKS)
def test_node_client(node: str, demo_gateway: str, check: str) -> None:
    done = subprocess.run(
        [node, "clients.mjs", demo_gateway, check],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict) and result
