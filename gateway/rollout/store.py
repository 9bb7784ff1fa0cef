"""Where rollout states live between reloads, restarts and processes: a JSON file under
`server.state_dir`, Redis when `shared_state` is set (every worker and replica reads the
same state; a move is a compare-and-set on the state's version), else this process only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from gateway.rollout.state import RolloutState
from policies.redis_client import RedisClient, RedisError
from policies.redis_quotas import SharedStateConfig

log = logging.getLogger("gateway.rollout")

FILE_NAME = "rollouts.json"

# KEYS[1] the state; ARGV[1] the new state (JSON), ARGV[2] the version it was made from
# (-1: whatever is there). 1: stored; 0: another process moved it first.
CAS = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(ARGV[2]) >= 0 then
  local ok, old = pcall(cjson.decode, cur)
  if ok and tonumber(old['version']) ~= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class StoreError(Exception):
    """The store cannot be read or written (the message names where, never a secret)."""


class RolloutStore(Protocol):
    shared: bool  # other processes write it too (read it again from time to time)

    async def load(self, model: str) -> RolloutState | None: ...

    async def save(self, state: RolloutState, base_version: int) -> bool:
        """Store `state`, made from the stored version `base_version` (-1: any). False:
        another process changed it first."""

    async def aclose(self) -> None: ...


class MemoryStore:
    """No state_dir, no shared_state: the state lives as long as the process (reloads keep it)."""

    shared = False

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    async def load(self, model: str) -> RolloutState | None:
        data = self.states.get(model)
        return RolloutState.from_dict(data) if data is not None else None

    async def save(self, state: RolloutState, base_version: int) -> bool:
        self.states[state.model] = state.to_dict()
        return True

    async def aclose(self) -> None:
        return None


class FileStore:
    """`state_dir/rollouts.json`: every rollout of this gateway, written whole and atomically
    (a temporary file renamed over it) off the event loop."""

    shared = False

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        return data if isinstance(data, dict) else {}

    def _write(self, model: str, state: dict[str, Any]) -> None:
        data = self._read()
        data[model] = state
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".rollouts-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def load(self, model: str) -> RolloutState | None:
        data = (await asyncio.to_thread(self._read)).get(model)
        if not isinstance(data, dict):
            return None
        try:
            return RolloutState.from_dict(data)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("rollout %s: the saved state in %s is unusable (%s); starting afresh",
                      model, self.path, exc)
            return None

    async def save(self, state: RolloutState, base_version: int) -> bool:
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, state.model, state.to_dict())
            except OSError as exc:
                raise StoreError(f"cannot write {self.path}: {exc.strerror}") from None
        return True

    async def aclose(self) -> None:
        return None


class RedisStore:
    """`{key_prefix}rollout:{model}` in the shared_state Redis, one JSON value per rollout."""

    shared = True

    def __init__(self, cfg: SharedStateConfig) -> None:
        self.prefix = f"{cfg.key_prefix}rollout:"
        self.timeout = cfg.timeout_s
        self.client = RedisClient(cfg.url(), connect_timeout=cfg.timeout_s)

    async def load(self, model: str) -> RolloutState | None:
        try:
            raw = await self.client.call("GET", self.prefix + model, timeout=self.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(f"shared_state: cannot read rollout {model}: "
                             f"{type(exc).__name__}") from None
        if raw is None:
            return None
        try:
            return RolloutState.from_dict(json.loads(raw))
        except (KeyError, ValueError, TypeError):
            log.error("rollout %s: the shared state is unusable; starting afresh", model)
            return None

    async def save(self, state: RolloutState, base_version: int) -> bool:
        try:
            stored = await self.client.script(
                CAS, [self.prefix + state.model], [json.dumps(state.to_dict()), base_version],
                timeout=self.timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(f"shared_state: cannot write rollout {state.model}: "
                             f"{type(exc).__name__}") from None
        return bool(stored)

    async def aclose(self) -> None:
        await self.client.aclose()
