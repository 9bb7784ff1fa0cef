"""Reading one field of an OpenAI request body: each problem is a 400 that names the field.
Shared by the gateway's own checks (gateway/validation.py) and a backend's (the local engine's
backends/local/request.py)."""

from __future__ import annotations

from typing import Any

from gateway.core.errors import InvalidRequest


def number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number.", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{value} is not a valid value for '{name}': it must be between {lo:g} and {hi:g}.",
            param=name, code="invalid_value",
        )
    return float(value)


def integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"{value} is not a valid value for '{name}': it must be between {lo} and {hi}.",
            param=name, code="invalid_value",
        )
    return value


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean.", param=name, code="invalid_type")
    return value


def unsupported(name: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{name}' is not supported by this model: {what}.", param=name,
                          code="unsupported_parameter")
