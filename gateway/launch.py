"""Start a real gateway process (`gateway serve`, uvicorn) on a free loopback port and wait
until it is ready: what the tests and the benchmarks run the gateway with, and what a user's
own integration tests can use (`with running_gateway(config, tmp_dir) as url: ...`)."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

# the demo tenants' keys (sk-demo-acme, sk-demo-globex, as in examples/demo.yaml) as sha256 digests
ACME_SHA = "d4ffc8c0325f7e8e971bb4d7bc9f6a78c97920b5ac57b24380e53b6c7a96bc13"
GLOBEX_SHA = "bbb8fab5ab2c83254e4969c119cdbb68880ee066c42a36223f8ac83fff2d5b96"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(model_dir: Path, **local: Any) -> dict[str, Any]:
    return {
        "server": {"admin_api_key_env": "GATEWAY_ADMIN_KEY", "max_body_bytes": "64KiB"},
        "backends": {
            "local": {"kind": "local", "model": str(model_dir), "kv_cache_bytes": "32MiB",
                      "adapters_dir": str(model_dir / "adapters"), **local},
        },
        "models": [{"name": "demo", "backend": "local"}],
        "tenants": [
            {"name": "acme", "api_key_sha256": [ACME_SHA], "models": ["demo"],
             "adapters": {"demo": "acme-support"}},
            {"name": "globex", "api_key_sha256": [GLOBEX_SHA], "models": ["demo"],
             "adapters": {"demo": "globex-legal"}},
        ],
    }


@contextlib.contextmanager
def running_gateway(
    config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None, timeout: float = 120,
    ready_path: str = "/ready", python: str | None = None, args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Yields the base URL ending in /v1; the process log is at workdir/gateway.log.
    `python`: the interpreter to run it with (another venv); default: this one.
    `args`: more `gateway serve` arguments (`--workers 2`)."""
    with gateway_process(config, workdir, env, timeout, ready_path, python, args) as (url, _):
        yield url


PORT_ATTEMPTS = 3


def _wait_ready(proc: subprocess.Popen[bytes], url: str, deadline: float, log_path: Path,
                timeout: float, retry: bool) -> bool:
    """True once `url` answers 200; False when the port was taken meanwhile and `retry`;
    otherwise a RuntimeError with the process's log."""
    while True:
        if proc.poll() is not None:
            text = log_path.read_text()
            if retry and "address already in use" in text:
                return False
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{text}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"gateway not ready in {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.2)


@contextlib.contextmanager
def gateway_process(
    config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None, timeout: float = 120,
    ready_path: str = "/ready", python: str | None = None, args: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like running_gateway, but also yields the process (for fault tests); `args`: more
    `gateway serve` arguments (--workers N)."""
    cfg_path = workdir / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(copy.deepcopy(config)))
    log_path = workdir / "gateway.log"
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + timeout
    for attempt in range(PORT_ATTEMPTS):  # a free port can be taken before the gateway binds it
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [python or sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg_path),
                 "--host", "127.0.0.1", "--port", str(port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=full_env,
            )
        base = f"http://127.0.0.1:{port}"
        if _wait_ready(proc, f"{base}{ready_path}", deadline, log_path, timeout,
                       retry=attempt + 1 < PORT_ATTEMPTS):
            break
    try:
        yield f"{base}/v1", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
