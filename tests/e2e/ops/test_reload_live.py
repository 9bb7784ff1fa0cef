"""Hot reload of a real `gateway serve` (one worker, and `--workers 2`) under streaming load,
driven by the official openai SDK: a tenant added, a key rotated in an `api_keys_file`, a
limit changed, then an invalid file; and a changed backend swapped while requests run.

Nothing here waits for time to pass: each step waits (bounded) for what it needs to see,
the new version in /debug/config on every worker, or a counter to reach a count."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.settings import load_settings
from gateway.state import config_version
from gateway.tenants import TenantDirectory
from tests.server import demo_config, gateway_process, metric

ADMIN = "sk-reload-admin"
OLD, NEW, INITECH, UMBRELLA = "sk-acme-old", "sk-acme-new", "sk-initech", "sk-umbrella"
LONG = 1800  # tokens of each long stream (ignore_eos): seconds of decode while the reload lands


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def admin(base: str, path: str, method: str = "GET") -> dict[str, Any]:
    r = httpx.request(method, base + path, headers={"authorization": f"Bearer {ADMIN}"},
                      timeout=30)
    return dict(r.json())


def versions(base: str, workers: int) -> set[str]:
    """The versions the gateway's workers serve (each worker's, under --workers N)."""
    body = admin(base, "/debug/config")
    if workers == 1:
        return {body["version"]}
    served = body["workers"]
    return set(served.values()) if len(served) == workers else {"(a worker is missing)"}


def expected_version(path: Path) -> str:
    settings = load_settings(path)
    return config_version(settings, TenantDirectory(settings.tenants))


def write(path: Path, cfg: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    os.replace(tmp, path)


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def status(url: str, key: str, model: str = "demo") -> int:
    try:
        client(url, key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code


class Load:
    """Threads streaming short chats as globex until stopped; every stream must end with a
    finish_reason (the SDK raises on an error event or a cut connection)."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self) -> None:
        c = client(self.url, "sk-demo-globex")
        while not self.stop.is_set():
            try:
                finish = None
                for chunk in c.chat.completions.create(
                        model="demo", messages=[{"role": "user", "content": "Where is it?"}],
                        max_tokens=12, stream=True):
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                with self._lock:
                    if finish is None:
                        self.failures.append("a stream ended without a finish_reason")
                    self.done += 1
            except Exception as exc:  # any failure of a request is the test's failure
                with self._lock:
                    self.failures.append(repr(exc))

    def wait_more(self, n: int) -> None:
        target = self.done + n
        wait_for(f"{n} more streamed requests", lambda: self.done >= target or bool(self.failures),
                 timeout=120)


def long_stream(url: str, key: str, results: list[Any], opened: threading.Event) -> None:
    """One long stream (LONG tokens): records its usage, or the exception that cut it."""
    try:
        stream = client(url, key).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=LONG, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage = None
        for chunk in stream:
            opened.set()
            usage = chunk.usage or usage
        results.append(usage.completion_tokens if usage is not None else None)
    except Exception as exc:
        opened.set()
        results.append(repr(exc))


def live_config(model_dir: Path) -> dict[str, Any]:
    cfg = demo_config(model_dir)
    cfg["server"]["admin_api_key_env"] = "RELOAD_ADMIN_KEY"
    acme = cfg["tenants"][0]
    acme.pop("api_key_sha256")
    acme["api_keys_file"] = "keys/acme.keys"
    cfg["tenants"].append({"name": "umbrella", "models": ["demo"],
                           "api_key_sha256": [hashlib.sha256(UMBRELLA.encode()).hexdigest()]})
    return cfg


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.timeout(400)
def test_reload_under_streaming_load(demo_model: Path, tmp_path: Path, workers: int) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "acme.keys").write_text(f"{OLD}\n")
    cfg = live_config(demo_model)
    args = ("--workers", str(workers)) if workers > 1 else ()
    env = {"RELOAD_ADMIN_KEY": ADMIN}
    with gateway_process(cfg, tmp_path, env, args=args) as (url, proc):
        base = url.removesuffix("/v1")
        path = tmp_path / "gateway.yaml"
        first = expected_version(path)
        wait_for("every worker up", lambda: versions(base, workers) == {first})
        assert status(url, OLD) == 200 and status(url, INITECH) == 401
        with Load(url) as load:
            load.wait_more(3)
            # long acme streams, open (a first chunk read) before the reload
            results: list[Any] = []
            longs = []
            for _ in range(2):
                opened = threading.Event()
                t = threading.Thread(target=long_stream, args=(url, OLD, results, opened))
                t.start()
                assert opened.wait(60)
                longs.append(t)
            # both counted as in flight (under --workers 2 another worker's gauges reach the
            # scrape at its next publish, once a second: the count is waited for, not read once)
            wait_for("both long streams in flight", lambda: metric(
                httpx.get(base + "/metrics").text, "gateway_requests_in_flight",
                tenant="acme") == 2)
            # the edit: acme's key rotated, initech added (a keys file of digests), a limit
            (tmp_path / "keys" / "acme.keys").write_text(f"# rotated\n{NEW}\n")
            (tmp_path / "keys" / "initech.keys").write_text(
                hashlib.sha256(INITECH.encode()).hexdigest() + "\n")
            edited = copy.deepcopy(cfg)
            edited["tenants"].append({"name": "initech", "models": ["demo"],
                                      "api_keys_file": "keys/initech.keys"})
            edited["tenants"][2]["limits"] = {"requests_per_minute": 1}
            write(path, edited)
            second = expected_version(path)
            assert second != first
            if workers == 1:
                proc.send_signal(signal.SIGHUP)
            else:  # one worker reloads and has the supervisor reload the others
                assert admin(base, "/admin/reload", "POST")["workers"] == "signalled"
            wait_for("the new version on every worker", lambda: versions(base, workers) == {second})
            # the long streams were still running when the new config served (read from the
            # clients: the gauge of another worker may be a second old)
            assert results == [] and all(t.is_alive() for t in longs), (
                f"the long streams ended before the reload: nothing was tested ({results})")
            load.wait_more(3)
            assert [status(url, NEW) for _ in range(4)] == [200] * 4
            assert [status(url, OLD) for _ in range(4)] == [401] * 4
            assert [status(url, INITECH) for _ in range(2)] == [200] * 2
            # requests_per_minute: 1 now, per worker: of workers + 1 requests one is refused
            assert 429 in [status(url, UMBRELLA) for _ in range(workers + 1)]

            # an invalid file: refused by every worker, and the running config serves on
            bad = copy.deepcopy(edited)
            bad["tenants"][0]["modles"] = ["demo"]
            write(path, bad)
            proc.send_signal(signal.SIGHUP)  # to the supervisor under --workers 2: forwarded
            wait_for("the refusals", lambda: metric(httpx.get(base + "/metrics").text,
                                                    "gateway_config_reloads_total",
                                                    result="invalid") >= workers)
            assert versions(base, workers) == {second}
            last = admin(base, "/debug/config")["last_reload"]
            assert last["result"] == "invalid" and "tenants[0].modles" in last["error"]
            assert [status(url, NEW) for _ in range(3)] == [200] * 3
            load.wait_more(3)
            for t in longs:
                t.join(timeout=300)
        assert load.failures == []
        assert results == [LONG, LONG], results  # not cut: every token of both
        scraped = httpx.get(base + "/metrics").text
        # every worker reloaded once (under --workers 2 the one that answered POST
        # /admin/reload saw the supervisor's SIGHUP after it, and found nothing new)
        assert metric(scraped, "gateway_config_reloads_total", result="ok") == workers
        assert metric(scraped, "gateway_config_last_reload_successful") == 0
    log = (tmp_path / "gateway.log").read_text()
    for secret in (OLD, NEW, INITECH, UMBRELLA, ADMIN, "sk-demo-globex"):
        assert secret not in log and secret not in scraped
    if workers > 1:  # reloaded in place: no worker was replaced
        assert log.count("Started server process") == workers


@pytest.mark.timeout(300)
def test_a_changed_backend_is_swapped_without_a_failed_request(demo_model: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "acme.keys").write_text(f"{OLD}\n")
    cfg = live_config(demo_model)
    with gateway_process(cfg, tmp_path, {"RELOAD_ADMIN_KEY": ADMIN}) as (url, _):
        base = url.removesuffix("/v1")
        path = tmp_path / "gateway.yaml"
        with Load(url, threads=4) as load:
            load.wait_more(4)
            edited = copy.deepcopy(cfg)
            edited["backends"]["local"]["kv_cache_bytes"] = "48MiB"  # a new engine
            write(path, edited)
            body = admin(base, "/admin/reload", "POST")
            assert body["result"] == "ok" and body["backends"] == {"local": "replaced"}
            load.wait_more(8)
        assert load.failures == []
        memory = admin(base, "/debug/memory")
        assert memory["backends"]["local"]["capacity"]["kv_bytes_total"] == 48 * 2**20
        scraped = httpx.get(base + "/metrics").text
        assert metric(scraped, "gateway_memory_budget_bytes", pool="kv") == 48 * 2**20
        assert metric(scraped, "gateway_requests_total", tenant="globex", status="200") == (
            metric(scraped, "gateway_requests_total", tenant="globex"))
        wait_for("the old engine closed", lambda: "closed replaced backends: local" in (
            tmp_path / "gateway.log").read_text())
