"""`python -m bench.overhead --quick` (no LiteLLM peer) completes and writes its outputs.

Timings on a shared CI machine are noise, so nothing here asserts a number; what can fail is
the harness itself: a target that does not start, requests that error, missing files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_overhead_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--quick", "--concurrency", "1", "8",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(line.startswith("|") and " target |" in line for line in proc.stdout.splitlines())
    result = json.loads((tmp_path / "overhead.json").read_text())
    rows = result["results"]
    targets = {r["target"] for r in rows}
    assert {"direct", "memgate", "floor", "memgate-2w"} <= targets
    assert {(r["stream"], r["concurrency"]) for r in rows} == {
        (s, c) for s in (False, True) for c in (1, 8)}
    for r in rows:
        assert r["errors"] == 0, r
        assert r["requests"] > 0 and r["p50_ms"] is not None
        if r["stream"]:
            assert r["ttft_p50_ms"] is not None
        # the servers' CPU per request is measured (the upstream, behind `direct`, is not ours)
        assert (r["cpu_us_per_req"] is None) == (r["target"] == "direct"), r
        if r["cpu_us_per_req"] is not None:
            assert r["cpu_us_per_req"] > 0, r
    assert result["memory"]["memgate"]["idle_rss_mb"] > 0
    png = (tmp_path / "overhead.png").read_bytes()
    assert png.startswith(b"\x89PNG")
