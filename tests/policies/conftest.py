"""Async policy tests run on asyncio through anyio's pytest plugin."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/policies/" in str(item.path) and item.get_closest_marker("anyio") is None:
            item.add_marker(pytest.mark.anyio)
