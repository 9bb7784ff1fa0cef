"""The processes under test: the fake upstream, memgate (`gateway serve`), the floor proxy and
the LiteLLM proxy, each started on a free loopback port and pinned to its cores."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.core.procmem import status_bytes

ROOT = Path(__file__).resolve().parents[2]
BENCH_KEY = "sk-bench"
LITELLM_VERSION = "1.106.12"
LITELLM_COMPROMISED = frozenset({"1.82.7", "1.82.8", "1.107.0"})
LITELLM_VENV = ROOT / ".venv-litellm-proxy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores(which: str) -> set[int] | None:
    """`server` -> {0}, `client` -> {1}, `all` -> both; None where there are not 2 cores."""
    have = sorted(os.sched_getaffinity(0))
    if len(have) < 2:
        return None
    return {"server": {have[0]}, "client": {have[1]}, "all": set(have[:2])}[which]


def rss_bytes(pid: int, key: str = "VmRSS") -> int:
    return status_bytes(pid, key) or 0


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (uvicorn's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


@dataclass
class Proc:
    """One started process tree; `url` is the base for /v1/chat/completions."""

    name: str
    url: str
    popen: subprocess.Popen[bytes] | None = None
    key: str | None = None
    model: str = "bench-model"
    log: Path | None = None
    idle_rss: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    def rss(self, key: str = "VmRSS") -> int:
        """Summed over the tree, minus uvicorn's supervisor when there are workers."""
        if self.popen is None:
            return 0
        pids = tree_pids(self.popen.pid)
        if len(pids) > 1:
            pids = pids[1:]
        return sum(rss_bytes(p, key) for p in pids)

    def cpu_seconds(self) -> float | None:
        """CPU time the process tree has used so far (every thread; /proc schedstat, ns)."""
        if self.popen is None:
            return None
        total = 0
        for pid in tree_pids(self.popen.pid):
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _pinned(which: str) -> Callable[[], None] | None:
    chosen = cores(which)
    if chosen is None:
        return None
    return lambda: os.sched_setaffinity(0, chosen)


def _ready(url: str, port: int, path: str | None) -> bool:
    try:
        if path is None:  # no GET route: a listening socket is enough
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        with urllib.request.urlopen(url + path, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(name: str, argv: Sequence[str], port: int, ready: str | None, workdir: Path,
          pin: str = "server", env: dict[str, str] | None = None, timeout: float = 120,
          cwd: Path = ROOT) -> Proc:
    log = workdir / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                 preexec_fn=_pinned(pin))
    proc = Proc(name, f"http://127.0.0.1:{port}", popen, log=log)
    deadline = time.monotonic() + timeout
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {popen.returncode}:\n{log.read_text()[-3000:]}")
        if _ready(proc.url, port, ready):
            break
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"{name} not ready in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    time.sleep(0.5)
    proc.idle_rss = proc.rss()
    return proc


def start_upstream(workdir: Path) -> Proc:
    port = free_port()
    return start("upstream", [sys.executable, "-m", "bench.overhead.upstream", "--port", str(port)],
                 port, "/v1/models", workdir, pin="client")


# Tenant limits that never refuse in this bench but are checked on every request: a request
# and tokens-per-minute bucket and a concurrency lease (with shared_state: Redis round trips)
BENCH_LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrency": 10**6}


# A spend budget that never refuses in this bench but is reserved and settled on every request
# (with shared_state: one Redis script each); the model then needs a price.
BENCH_BUDGET = {"amount": 10**9, "period": "month"}
BENCH_PRICE = {"input_per_1m": 0.5, "output_per_1m": 1.5}


def gateway_config(upstream: str, limits: bool = False, redis_url: str | None = None,
                   budget: bool = False) -> dict[str, object]:
    """One `openai` backend on the fake upstream, one tenant, the default policy chain (those
    of its names that are registered: the chain grows while this bench stays put).
    `limits`: the tenant has BENCH_LIMITS; `redis_url`: they are kept in Redis (shared_state);
    `budget`: the tenant also has BENCH_BUDGET, the model BENCH_PRICE."""
    from policies.registry import DEFAULT_POLICIES, POLICY_KINDS

    tenant: dict[str, object] = {"name": "bench", "api_key_sha256": [hashlib.sha256(BENCH_KEY.encode()).hexdigest()], "models": ["bench-model"]}
    if limits or redis_url:
        tenant["limits"] = BENCH_LIMITS
    cfg: dict[str, object] = {
        "policies": [p for p in DEFAULT_POLICIES if p in POLICY_KINDS],
        "server": {"max_body_bytes": "1MiB"},
        "backends": {"up": {"kind": "openai", "url": f"{upstream}/v1"}},
        "models": [{"name": "bench-model", "backend": "up"}],
        "tenants": [tenant],
    }
    if budget:
        tenant["limits"] = {**BENCH_LIMITS, "budget": BENCH_BUDGET}
        cfg["models"] = [{"name": "bench-model", "backend": "up", "price": BENCH_PRICE}]
    if redis_url:
        cfg["shared_state"] = {"redis_url": redis_url, "key_prefix": "bench:"}
    return cfg


def start_redis(workdir: Path) -> Proc:
    """Debian's redis-server on a free loopback port, beside the upstream (client core)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]
    proc = start("redis", argv, port, None, workdir, pin="client")
    proc.url = f"redis://127.0.0.1:{port}/0"
    return proc


def start_gateway(upstream: str, workdir: Path, workers: int = 1,
                  extra_env: dict[str, str] | None = None, name: str = "memgate",
                  source: Path = ROOT, module: str = "gateway.cli", limits: bool = False,
                  redis_url: str | None = None, budget: bool = False) -> Proc:
    """`source`: the checkout whose gateway runs (another commit's, for --baseline);
    `module`: what runs it (bench.overhead.aiohttp_gateway: the aiohttp client);
    `limits`, `redis_url`, `budget`: see gateway_config."""
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(upstream, limits, redis_url, budget)))
    port = free_port()
    argv = [sys.executable, "-m", module, "serve", "--config", str(cfg),
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    proc = start(name, argv, port, "/ready", workdir, pin="server" if workers == 1 else "all",
                 env=extra_env, cwd=source)
    proc.key = BENCH_KEY
    return proc


def start_floor(upstream: str, workdir: Path) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "bench.overhead.floor", "--port", str(port), "--upstream", upstream]
    return start("floor", argv, port, None, workdir)


def ensure_litellm() -> Path:
    """The LiteLLM proxy in its own venv, pinned exactly; compromised releases refused."""
    if LITELLM_VERSION in LITELLM_COMPROMISED:
        raise RuntimeError(f"litellm {LITELLM_VERSION} is a compromised release")
    py = LITELLM_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    probe = [str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    have = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    if have != LITELLM_VERSION:
        subprocess.run([str(py), "-m", "pip", "install", "-q",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
        have = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    if have in LITELLM_COMPROMISED or have != LITELLM_VERSION:
        raise RuntimeError(f"refusing litellm {have!r}: want exactly {LITELLM_VERSION}")
    return LITELLM_VENV / "bin" / "litellm"


def start_litellm(upstream: str, workdir: Path) -> Proc:
    exe = ensure_litellm()
    key = "sk-" + secrets.token_hex(24)  # the proxy refuses to start without a strong key
    cfg = workdir / "litellm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "bench-model",
                        "litellm_params": {"model": "openai/bench-model",
                                           "api_base": f"{upstream}/v1", "api_key": "sk-fake"}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": key},
    }))
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "DATABASE_URL": "", "LITELLM_TELEMETRY": "False"}
    env_clean = {k: v for k, v in env.items() if v}
    proc = start("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "1"],
                 port, "/health/liveliness", workdir, env=env_clean, timeout=240)
    proc.key = key
    return proc
