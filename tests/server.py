"""Helpers of the tests that start a real gateway process (gateway/launch.py starts it)."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.launch import (
    ACME_SHA,
    GLOBEX_SHA,
    demo_config,
    free_port,
    gateway_process,
    running_gateway,
)

__all__ = ["ACME_SHA", "GLOBEX_SHA", "demo_config", "free_port", "gateway_process", "metric",
           "reservations", "running_gateway"]


def reservations(url: str, admin_key: str = "sk-admin") -> dict[str, Any]:
    """Admission's reservations as /debug/memory shows them of a gateway (`url` ends in /v1)."""
    r = httpx.get(url.removesuffix("/v1") + "/debug/memory",
                  headers={"authorization": f"Bearer {admin_key}"}, timeout=10)
    r.raise_for_status()
    return dict(r.json()["reservations"])


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with these labels in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
