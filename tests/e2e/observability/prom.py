"""A real Prometheus (the Debian `prometheus` binary) on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.server import free_port


@contextlib.contextmanager
def running_prometheus(targets: list[str], workdir: Path, timeout: float = 30) -> Iterator[str]:
    """Scrapes `targets` (host:port) every second; yields the base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("the `prometheus` binary is missing: run `make obs-tools` (apt-get)")
    cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
           "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": targets}]}]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "prometheus.log").read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus not ready:\n" + (workdir / "prometheus.log").read_text())
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def instant(base: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise AssertionError(f"{expr}: {body}")
    return list(body["data"]["result"])


def wait_for_targets_up(base: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([s for s in instant(base, "up") if s["value"][1] == "1"]) >= n:
            return
        time.sleep(0.3)
    raise AssertionError("targets never came up")
