"""Hot reload: re-read the config and the keys files, validate, and swap the app's state.

Triggers: SIGHUP (both `server.reload` modes; with `gateway serve --workers N` the
supervisor forwards it to every worker, gateway/http/server.py), `POST /admin/reload`, and
with `server.reload: watch` a poll of the config file and every `api_keys_file` once a second
(by content, so Kubernetes ConfigMap and Secret mounts, which swap a `..data` symlink, are
seen like any edit).

A reload is all or nothing:
- the file is validated completely (the same file-and-field errors as at start); an invalid
  file is refused and the running config stays (result `invalid`);
- backends whose definition did not change are kept as they are (a tenant edit restarts no
  engine); a new or changed backend is started beside the running one, and one that fails to
  start refuses the reload (result `failed`; the ones started for it are closed);
- then a new GatewayState (tenants, keys, limits, policies, models) is swapped in at once.
  Requests in flight finish under the state they started with (the handler holds it); the
  new policy chain shares the old one's reservations, admission queue, quotas and replica
  counts (policies/registry.build_chain), so nothing is forgotten or counted twice; a
  replaced backend is closed once no request of an older state is left.

Fields that only take effect at start (the listening address, the reload mode, the log
format, the HTTP timeouts, the tracing exporter) are reported in `restart_required`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.registry import backend_class
from gateway.core.backend import Backend
from gateway.settings import ConfigError, Settings, load_settings
from gateway.state import GatewayState, build_state, config_version
from gateway.tenants import TenantDirectory

log = logging.getLogger("gateway.reload")

WATCH_INTERVAL_S = 1.0
RETIRE_POLL_S = 0.05
RESTART_FIELDS = ("host", "port", "reload", "log_format", "header_timeout_s",
                  "keep_alive_timeout_s", "shutdown_grace_s", "cors_origins", "torch_threads",
                  "recycle_other_bytes")
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"  # set by `gateway serve --workers N`

# SIGHUP before the app's lifespan installed its handler (a worker still loading): remembered
# here by the early handler (arm_sighup) and served once the app has started.
_EARLY_SIGHUP = threading.Event()


@dataclass(frozen=True)
class ReloadResult:
    result: str  # ok | unchanged | invalid | failed
    version: str  # the version serving after it
    previous: str
    trigger: str  # signal | watch | api
    error: str | None = None
    backends: dict[str, str] = field(default_factory=dict)  # name -> kept | started | closing
    restart_required: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)

    @property
    def refused(self) -> bool:
        return self.result in ("invalid", "failed")

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": self.result, "version": self.version,
                               "previous_version": self.previous, "trigger": self.trigger,
                               "at": self.at, "backends": self.backends,
                               "restart_required": list(self.restart_required)}
        if self.error is not None:
            out["error"] = self.error
        return out


def arm_sighup() -> None:
    """Main thread, before the app starts: a SIGHUP now is remembered, not fatal."""
    signal.signal(signal.SIGHUP, lambda sig, frame: _EARLY_SIGHUP.set())


def _fingerprint(path: str, key_files: list[str]) -> str:
    """The bytes of the config file and of the keys files it names (a read error counts)."""
    h = hashlib.sha256()
    for name in (path, *key_files):
        try:
            h.update(Path(name).read_bytes())
        except OSError as exc:
            h.update(f"unreadable {exc.errno}".encode())
        h.update(b"\0")
    return h.hexdigest()


def _read(path: str) -> tuple[Settings, TenantDirectory]:
    """The config file validated, and its tenants' keys read (env, keys files)."""
    settings = load_settings(path)
    try:
        return settings, TenantDirectory(settings.tenants)
    except ValueError as exc:  # a keys file changed since validation a moment ago
        raise ConfigError(f"{path}: {exc}") from None


def _key_files(settings: Settings) -> list[str]:
    return [t.api_keys_file for t in settings.tenants if t.api_keys_file]


def _restart_fields(old: Settings, new: Settings) -> tuple[str, ...]:
    fields = [f"server.{n}" for n in RESTART_FIELDS
              if getattr(old.server, n) != getattr(new.server, n)]
    for name in ("telemetry", "shared_state"):
        if getattr(old, name) != getattr(new, name):
            fields.append(name)
    return tuple(fields)


class Reloader:
    """Owns the app's current GatewayState and every swap of it. `publish` makes a state the
    one new requests see (the generation handler's and the routes')."""

    def __init__(self, state: GatewayState, publish: Callable[[GatewayState], None]) -> None:
        self.state = state
        self._publish = publish
        self.last: ReloadResult | None = None
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._older: list[GatewayState] = []  # superseded states that may still serve requests
        self._closing: list[Backend] = []  # replaced backends not closed yet
        self._watch: asyncio.Task[None] | None = None
        self._signal = False
        self._seen = ""  # the watched files' fingerprint last acted on

    # ---- lifecycle (the app's lifespan) ---------------------------------------------------

    async def start(self) -> None:
        """After the backends started: the SIGHUP handler, the watch, a SIGHUP that came early."""
        state = self.state
        state.telemetry.metrics.config_loaded(state.version, None)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self.request, "signal")
                self._signal = True
        if _EARLY_SIGHUP.is_set():
            _EARLY_SIGHUP.clear()
            self.request("signal")
        if state.settings.server.reload == "watch" and state.settings.digest:
            self._seen = await asyncio.to_thread(
                _fingerprint, state.settings.source, _key_files(state.settings))
            self._watch = loop.create_task(self._watch_loop())

    def request(self, trigger: str) -> None:
        """Reload in the background (a signal handler's way in)."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> list[Backend]:
        """Stop watching and listening; the replaced backends not closed yet (the lifespan
        closes them with the current ones)."""
        if self._signal:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in [self._watch, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        closing, self._closing = self._closing, []
        return closing

    # ---- the reload -------------------------------------------------------------------------

    async def reload(self, trigger: str) -> ReloadResult:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            result = await self._reload(trigger)
        self.last = result
        metrics = self.state.telemetry.metrics
        metrics.reloaded(result.result)
        if result.result == "ok":
            metrics.config_loaded(result.version, result.previous)
            log.info("config reloaded (%s): version %s -> %s; backends %s%s", trigger,
                     result.previous, result.version, result.backends or "unchanged",
                     f"; needs a restart: {', '.join(result.restart_required)}"
                     if result.restart_required else "")
        elif result.refused:
            log.error("config reload (%s) refused, still serving version %s: %s", trigger,
                      result.version, result.error)
        return result

    async def _reload(self, trigger: str) -> ReloadResult:
        current = self.state
        source = current.settings.source
        if not current.settings.digest:
            return ReloadResult("invalid", current.version, current.version, trigger,
                                error="this config was not loaded from a file")
        try:  # the files are read off the event loop
            settings, tenants = await asyncio.to_thread(_read, source)
        except ConfigError as exc:
            return ReloadResult("invalid", current.version, current.version, trigger,
                                error=str(exc))
        if config_version(settings, tenants) == current.version:
            return ReloadResult("unchanged", current.version, current.version, trigger)
        backends, started, report = self._plan_backends(current, settings)
        for backend in started:
            try:
                await backend.start()
            except Exception as exc:  # a backend that cannot start refuses the reload
                await _close_all(started)
                return ReloadResult("failed", current.version, current.version, trigger,
                                    error=f"backends.{backend.name}: cannot start: {exc}")
        state = build_state(settings, backends, current.telemetry, current.drain, current,
                            tenants)
        state.ready = current.ready
        await current.telemetry.reconfigure(
            settings, backends, lambda v: state.tenants.is_key(v) or state.admin.is_key(v))
        self._swap(current, state)
        return ReloadResult("ok", state.version, current.version, trigger, backends=report,
                            restart_required=_restart_fields(current.settings, settings))

    def _plan_backends(self, current: GatewayState, settings: Settings
                       ) -> tuple[dict[str, Backend], list[Backend], dict[str, str]]:
        """Keep each backend whose definition is the same; build the new and changed ones."""
        backends: dict[str, Backend] = {}
        started: list[Backend] = []
        report: dict[str, str] = {}
        for name, spec in settings.backends.items():
            old = current.backends.get(name)
            if old is not None and current.settings.backends.get(name) == spec:
                backends[name] = old
                continue
            backends[name] = backend_class(spec.kind)(name, spec.config)
            started.append(backends[name])
            report[name] = "started" if old is None else "replaced"
        for name in current.backends:
            if name not in settings.backends:
                report[name] = "removed"
        return backends, started, report

    def _swap(self, current: GatewayState, state: GatewayState) -> None:
        self.state = state
        self._publish(state)
        self._older.append(current)
        replaced = [b for name, b in current.backends.items() if state.backends.get(name) is not b]
        if replaced:
            self._closing.extend(replaced)
            task = asyncio.get_running_loop().create_task(self._retire(replaced))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retire(self, replaced: list[Backend]) -> None:
        """Close the replaced backends once every request of an older state has finished."""
        while True:
            self._older = [s for s in self._older if s.active > 0]
            if not self._older:
                break
            await asyncio.sleep(RETIRE_POLL_S)
        for backend in replaced:
            if backend in self._closing:
                self._closing.remove(backend)
                await _close_all([backend])
        log.info("closed replaced backends: %s", ", ".join(b.name for b in replaced))

    # ---- watch --------------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            settings = self.state.settings
            try:
                seen = await asyncio.to_thread(_fingerprint, settings.source, _key_files(settings))
            except Exception:
                log.exception("watching %s failed", settings.source)
                continue
            if seen != self._seen:
                self._seen = seen
                await self.reload("watch")

    # ---- workers ------------------------------------------------------------------------------

    def tell_supervisor(self) -> bool:
        """Under `gateway serve --workers N`: ask the supervisor to reload every worker (it
        forwards SIGHUP to each). False when this process has no such supervisor."""
        ppid = os.getppid()
        if os.environ.get(SUPERVISOR_ENV) != str(ppid):
            return False
        os.kill(ppid, signal.SIGHUP)
        return True


async def _close_all(backends: list[Backend]) -> None:
    for backend in backends:
        try:
            await backend.aclose()
        except Exception:
            log.exception("closing backend %s failed", backend.name)
