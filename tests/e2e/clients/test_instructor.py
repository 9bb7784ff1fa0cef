"""instructor against the local demo: its TOOLS, JSON_SCHEMA and JSON modes, `create_iterable`
and `create_partial`, each asserting the typed result. instructor pins jiter < 0.15 and the
gateway's openai needs 0.19, so it lives in .venv-instructor (`make instructor-venv`, which
`make test` builds): tests/e2e/clients/instructor_client.py runs there and prints its results
as JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[3]
PYTHON = ROOT / ".venv-instructor" / "bin" / "python"
SCRIPT = Path(__file__).with_name("instructor_client.py")


class Weather(BaseModel):  # the script's response model
    city: str
    celsius: int


@pytest.fixture(scope="module")
def results(demo_gateway: str) -> dict[str, Any]:
    if not PYTHON.exists():
        pytest.fail("the instructor venv is missing: run `make instructor-venv` (make test does)")
    done = subprocess.run([str(PYTHON), str(SCRIPT), demo_gateway], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def result(results: dict[str, Any], check: str) -> dict[str, Any]:
    got = results[check]
    assert "error" not in got, got["error"]
    return dict(got["result"])


@pytest.mark.parametrize(("mode", "finish"), [("TOOLS", "tool_calls"), ("JSON_SCHEMA", "stop"),
                                              ("JSON", "stop")])
def test_a_mode_returns_the_typed_result(results: dict[str, Any], mode: str, finish: str) -> None:
    got = result(results, mode)
    assert got["type"] == "Weather" and got["finish_reason"] == finish
    Weather.model_validate(got["weather"])


def test_create_iterable(results: dict[str, Any]) -> None:
    items = result(results, "create_iterable")["items"]
    assert items
    for item in items:
        Weather.model_validate(item)


def test_create_partial(results: dict[str, Any]) -> None:
    got = result(results, "create_partial")
    partials, whole = got["partials"], Weather.model_validate(got["weather"])
    assert len(partials) > 1 and partials[-1] == whole.model_dump()
    assert any(p["celsius"] is None for p in partials)  # streamed: seen before it was whole
    for p in partials:  # each a prefix of the whole: the tool call's arguments in order
        assert p["city"] is None or whole.city.startswith(p["city"]), p
