"""instructor against a gateway, run by tests/e2e/clients/test_instructor.py with
.venv-instructor/bin/python (`make instructor-venv`: instructor pins jiter < 0.15, the
gateway's openai needs 0.19). `python instructor_client.py URL` runs every check and prints
one JSON object, check -> {"result": ...} or {"error": ...}; the test asserts on it.

The checks: instructor's TOOLS, JSON_SCHEMA and JSON modes (`create_with_completion`: the
typed result and the finish reason), `create_iterable` and `create_partial` (the partial
objects as they stream, the last validated whole), each one request at temperature 0, seed 1
(the demo model answers the weather question below in its JSON lessons' shape)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import instructor
import openai
from pydantic import BaseModel

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SETTINGS: dict[str, Any] = {"model": "demo", "max_tokens": 60, "temperature": 0, "seed": 1,
                            "max_retries": 0}  # max_retries: instructor's, no re-asking


class Weather(BaseModel):
    city: str
    celsius: int


def client(url: str, mode: instructor.Mode) -> Any:
    sdk = openai.OpenAI(base_url=url, api_key="sk-demo-acme", max_retries=0, timeout=60)
    return instructor.from_openai(sdk, mode=mode)


def mode_check(mode: instructor.Mode) -> Callable[[str], dict[str, Any]]:
    def check(url: str) -> dict[str, Any]:
        weather, completion = client(url, mode).chat.completions.create_with_completion(
            messages=ASK, response_model=Weather, **SETTINGS)
        assert isinstance(weather, Weather), type(weather)
        return {"weather": weather.model_dump(), "type": type(weather).__name__,
                "finish_reason": completion.choices[0].finish_reason}
    return check


def iterable(url: str) -> dict[str, Any]:
    items = list(client(url, instructor.Mode.TOOLS).chat.completions.create_iterable(
        messages=ASK, response_model=Weather, **SETTINGS))
    assert all(isinstance(w, Weather) for w in items), items
    return {"items": [w.model_dump() for w in items]}


def partial(url: str) -> dict[str, Any]:
    partials = [p.model_dump() for p in client(url, instructor.Mode.TOOLS).chat.completions
                .create_partial(messages=ASK, response_model=Weather, **SETTINGS)]
    last = Weather.model_validate(partials[-1])  # the last partial is the whole object
    return {"partials": partials, "weather": last.model_dump()}


CHECKS: dict[str, Callable[[str], dict[str, Any]]] = {
    "TOOLS": mode_check(instructor.Mode.TOOLS),
    "JSON_SCHEMA": mode_check(instructor.Mode.JSON_SCHEMA),
    "JSON": mode_check(instructor.Mode.JSON),
    "create_iterable": iterable,
    "create_partial": partial,
}


def main(url: str) -> None:
    out: dict[str, Any] = {}
    for name, check in CHECKS.items():
        try:
            out[name] = {"result": check(url)}
        except Exception as e:  # reported per check; the test shows it
            out[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
