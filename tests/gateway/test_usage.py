"""Usage records (gateway/usage.py) and `gateway usage` (gateway/usage_report.py): one record
per finished request, adding up to the Prometheus counters; keys never in a record; the file
rotated by size; per-worker and rotated files summed; OTLP log records when asked."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from gateway.app import create_app
from gateway.cli import main
from gateway.settings import load_settings
from gateway.usage import UsageLog, usage_metadata, worker_path
from gateway.usage_report import UsageError, files, report
from tests.gateway.upstream import Upstream

KEY = "sk-usage-acme"
ADMIN = "sk-usage-admin"


def config(url: str, usage: Path) -> dict[str, Any]:
    import hashlib

    return {
        "server": {"admin_api_key_env": "USAGE_ADMIN_KEY", "usage_log": str(usage)},
        "backends": {"up": {"kind": "openai", "url": url}},
        "models": [{"name": "m", "backend": "up",
                    "price": {"input_per_1m": 2.0, "output_per_1m": 10.0}}],
        "tenants": [{"name": "acme", "models": ["m"],
                     "api_key_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}],
        "telemetry": {"otlp_usage_logs": True},
    }


def counters(text: str, name: str) -> dict[tuple[str, ...], float]:
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
            out[labels] = float(m.group(2))
    return out


def test_records_add_up_to_the_counters_and_hold_no_key(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGE_ADMIN_KEY", ADMIN)
    usage = tmp_path / "usage" / "usage.jsonl"
    exporter = InMemoryLogRecordExporter()
    logs = LoggerProvider()
    logs.add_log_record_processor(SimpleLogRecordProcessor(exporter))

    async def go() -> str:
        async with Upstream() as up:
            import yaml

            path = tmp_path / "gateway.yaml"
            path.write_text(yaml.safe_dump(config(up.url, usage)))
            app = create_app(load_settings(path), logger_provider=logs)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                    auth = {"authorization": f"Bearer {KEY}"}
                    msgs = [{"role": "user", "content": f"my key is {KEY}"}]
                    sent = [
                        await c.post("/v1/chat/completions", headers=auth, json={
                            "model": "m", "messages": msgs, "user": "alice",
                            "metadata": {"team": "search", "ticket": KEY}}),
                        await c.post("/v1/chat/completions", headers=auth, json={
                            "model": "m", "messages": msgs, "user": f"Bearer {KEY}"}),
                        await c.post("/v1/chat/completions", headers=auth, json={
                            "model": "m", "messages": msgs, "stream": True}),
                        await c.post("/v1/chat/completions", json={"model": "m"},
                                     headers={"authorization": "Bearer sk-nope"}),
                        await c.post("/v1/chat/completions", headers=auth,
                                     json={"model": "nope", "messages": msgs}),
                        await c.post("/v1/chat/completions", headers=auth,
                                     json={"model": "m", "messages": msgs, "max_tokens": -1}),
                    ]
                    assert [r.status_code for r in sent] == [200, 200, 200, 401, 404, 400]
                    scraped = (await c.get("/metrics")).text
            return scraped  # the lifespan's end flushed the records

    scraped = asyncio.run(go())
    text = usage.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 6
    assert KEY not in text and "sk-nope" not in text and "my key is" not in text
    by_status = {r["status"]: r for r in records}
    ok = records[0]
    assert ok["tenant"] == "acme" and ok["model"] == ok["served_model"] == "m"
    assert ok["backend"] == "up" and ok["user"] == "alice" and ok["stream"] is False
    assert ok["metadata"] == {"team": "search", "ticket": "[redacted]"}
    assert ok["prompt_tokens"] == 3 and ok["completion_tokens"] == 1
    assert ok["cost"] == pytest.approx((3 * 2.0 + 1 * 10.0) / 1e6)
    assert ok["request_id"] and ok["duration_s"] >= ok["ttft_s"] > 0
    assert records[1]["user"] == "[redacted]"
    assert records[2]["stream"] is True
    assert by_status[401]["tenant"] is None and by_status[401]["model"] is None
    assert by_status[404]["tenant"] is None  # as its counter: before a request context
    # the records sum to what Prometheus counts
    requests = counters(scraped, "gateway_requests_total")
    assert sum(requests.values()) == len(records)
    for labels, value in requests.items():
        d = dict(labels)
        tenant = None if d["tenant"] == "none" else d["tenant"]
        model = None if d["model"] == "none" else d["model"]
        assert value == sum(1 for r in records if (r["tenant"], r["model"], str(r["status"]))
                            == (tenant, model, d["status"])), labels
    assert sum(counters(scraped, "gateway_prompt_tokens_total").values()) == sum(
        r["prompt_tokens"] for r in records)
    assert sum(counters(scraped, "gateway_completion_tokens_total").values()) == sum(
        r["completion_tokens"] for r in records)
    # the same records as OTLP log records
    exported = [dict(d.log_record.attributes or {}) for d in exporter.get_finished_logs()]
    assert len(exported) == 6 and exported[0]["tenant"] == "acme"
    assert exported[0]["metadata.team"] == "search"
    assert KEY not in json.dumps(exported, default=str)


def test_metadata_is_bounded() -> None:
    raw: dict[str, Any] = {f"k{i}": "v" for i in range(20)}
    raw["k0"] = "x" * 600  # too long: left out
    raw["n"] = 3  # not a string: left out
    got = usage_metadata(raw)
    assert got is not None and len(got) == 16 and "k0" not in got and "n" not in got
    assert usage_metadata("nope") is None and usage_metadata({}) is None


def test_the_log_rotates_by_size_and_keeps_n_files(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    log = UsageLog(path, max_bytes=4096, backups=2)
    record = {"time": 1.0, "tenant": "acme", "pad": "x" * 200}
    for _ in range(10):  # ten flushes of 5 records (about 1.1 kB each)
        for _ in range(5):
            log.write(record)
        log.flush()
    assert log.written == 50
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 4096
        assert all(orjson.loads(line)["tenant"] == "acme" for line in p.read_bytes().splitlines())


def test_worker_files_rotated_files_and_torn_lines_are_summed(tmp_path: Path) -> None:
    now = time.time()
    main_file = tmp_path / "usage.jsonl"
    assert worker_path(str(main_file), True, 41) == tmp_path / "usage.41.jsonl"
    assert worker_path(str(main_file), False) == main_file

    def line(tenant: str, age: float, status: int = 200, cost: float = 0.5) -> str:
        return json.dumps({"time": now - age, "tenant": tenant, "model": "m", "status": status,
                           "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 0,
                           "cost": cost, "kv_bytes_reserved": 100}) + "\n"

    (tmp_path / "usage.41.jsonl").write_text(line("acme", 10) + line("globex", 20, 429))
    (tmp_path / "usage.41.jsonl.1").write_text(line("acme", 7200))  # two hours old
    (tmp_path / "usage.42.jsonl").write_text(line("acme", 30) + '{"time": 1, "tena')  # torn
    (tmp_path / "other.jsonl").write_text(line("nobody", 1))  # not this log
    assert {p.name for p in files([str(main_file)])} == {
        "usage.41.jsonl", "usage.41.jsonl.1", "usage.42.jsonl"}
    out = json.loads(report([str(main_file)], "tenant", "1h", as_json=True))
    assert out["skipped_lines"] == 1
    assert out["groups"] == [
        {"tenant": "acme", "requests": 2, "errors": 0, "prompt_tokens": 20,
         "completion_tokens": 10, "cached_tokens": 0, "cost": 1.0, "kv_bytes_reserved": 200},
        {"tenant": "globex", "requests": 1, "errors": 1, "prompt_tokens": 10,
         "completion_tokens": 5, "cached_tokens": 0, "cost": 0.5, "kv_bytes_reserved": 100}]
    everything = json.loads(report([str(tmp_path)], "tenant,status", None, as_json=True))
    assert sum(g["requests"] for g in everything["groups"]) == 5  # a directory: every file
    with pytest.raises(UsageError):
        report([str(main_file)], "colour", None)
    with pytest.raises(UsageError):
        report([str(main_file)], "tenant", "soon")
    with pytest.raises(UsageError):
        report([str(tmp_path / "nothing" / "usage.jsonl")], "tenant", None)


def test_the_cli_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_text(json.dumps({"time": time.time(), "tenant": "acme", "status": 200,
                                "prompt_tokens": 7, "completion_tokens": 3, "cost": None}) + "\n")
    assert main(["usage", str(path), "--by", "tenant", "--since", "5m"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["tenant", "requests", "errors", "prompt_tokens",
                              "completion_tokens", "cached_tokens", "cost", "kv_bytes_reserved"]
    assert out[1].split() == ["acme", "1", "0", "7", "3", "0", "0.000000", "0"]
    assert main(["usage", str(tmp_path / "missing.jsonl")]) == 2
