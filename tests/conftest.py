"""Shared fixtures: the demo model, and real gateway processes on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new examples on every developer run; under CI (CI=true) they replay
# a fixed sequence, so a run's verdict depends on the code, not on the draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "models" / "demo"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo checkpoint `make test` builds before the tests (built here if missing)."""
    if not (DEMO_DIR / "config.json").exists():
        from backends.local.commands.demo import write_demo

        write_demo(DEMO_DIR)
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo_gateway(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `gateway serve` on the demo config; yields its base URL (…/v1)."""
    from tests.server import demo_config, running_gateway

    cfg = demo_config(demo_model)
    with running_gateway(cfg, tmp_path_factory.mktemp("demo"), env={"GATEWAY_ADMIN_KEY": "sk-admin"}) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# `make test-unit` runs the in-process suites: -m "not e2e and not engine and not
# process ...". The marks come from where a test lives and which fixtures it takes, so a new
# test is in or out without a mark of its own.
PROCESS_FIXTURES = frozenset({"redis_url", "demo_gateway"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(ROOT).parts if item.path.is_relative_to(ROOT) else ()
        if parts[:2] == ("tests", "e2e"):
            item.add_marker(pytest.mark.e2e)
        elif parts[:3] == ("tests", "backends", "local"):
            item.add_marker(pytest.mark.engine)
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the session (tests use their own
    key prefixes)."""
    from tests.redis_server import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url
