"""The 2-minute soak (marker `soak`, `make test-soak`; `make test` leaves it out): mixed traffic
from two tenants plus clients that disconnect mid-stream; RSS must not grow after warm-up and
nothing may stay held at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import run_soak, table


@pytest.mark.soak
@pytest.mark.timeout(400)
def test_two_minute_soak(demo_model: Path, tmp_path: Path) -> None:
    result = run_soak(2.0, tmp_path / "soak.json")
    print(table(result))
    assert result["requests"] > 100
    assert result["5xx"] == 0 and result["errors"] == 0, result["by_status"]
    assert result["by_status"].get("200", 0) > 50
    assert result["rss_growth_pct"] < 5, result["rss_series_mb"]
    assert result["end"] == {"reserved_bytes": 0, "kv_used": 0, "adapters_pinned": {},
                             "requests_in_flight": 0}
    assert result["ready_at_end"] == 200
