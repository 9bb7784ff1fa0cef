"""Limits that hold across gateway processes (`--workers N`, several pods): tenant rate
buckets and leases on shared capacity kept in one Redis primary (optionally behind Sentinel;
Redis Cluster is out of scope), through the atomic scripts of policies/redis_scripts.py.

```yaml
shared_state:
  redis_url: redis://127.0.0.1:6379/0   # or redis_url_env: NAME; rediss:// and passwords work
  key_prefix: "memgate:"
  lease_ttl_s: 30
  on_unavailable: local_share           # or reject
```

- Every process keeps a heartbeat in Redis (a sorted set of process ids with an expiry), so
  each knows how many gateway processes are live; the last count is kept while Redis is down.
- Every lease this process holds is renewed every lease_ttl_s / 3 while its request runs; a
  process that dies (SIGKILL) stops renewing and its leases are reclaimed, by the next script
  that reads their scope, within lease_ttl_s.
- Redis down (refused, timed out, loading, read-only): `local_share` answers from this
  process's own book (policies/leases.py) with every limit divided by the number of live
  processes, never the full limit per process; `reject` raises 503 with Retry-After. Both are
  counted (`fallbacks`); Redis is probed again every second and used as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from gateway.core.errors import Unavailable
from policies import redis_scripts
from policies.leases import Bucket, LocalBook, Scope
from policies.quotas import wait_event
from policies.redis_client import RedisClient, RedisError

log = logging.getLogger("gateway.shared_state")

ON_UNAVAILABLE = ("local_share", "reject")
PROBE_S = 1.0  # while Redis is down: how often it is tried again
# errors that mean "not now" rather than a bug: loading its data, a replica, no primary
UNAVAILABLE_ERRORS = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN")
T = TypeVar("T")


@dataclass(frozen=True)
class SharedStateConfig:
    redis_url: str | None = None
    redis_url_env: str | None = None  # the environment variable that holds the URL instead
    key_prefix: str = "memgate:"
    lease_ttl_s: float = 30.0
    on_unavailable: str = "local_share"
    timeout_s: float = 0.5  # one round trip; past it Redis counts as down

    def __post_init__(self) -> None:
        if (self.redis_url is None) == (self.redis_url_env is None):
            raise ValueError("shared_state: give redis_url or redis_url_env (one of them)")
        if self.on_unavailable not in ON_UNAVAILABLE:
            raise ValueError(f"shared_state.on_unavailable must be one of {', '.join(ON_UNAVAILABLE)}")
        if not 0.3 <= self.lease_ttl_s <= 3600 or not 0 < self.timeout_s <= 30:
            raise ValueError("shared_state.lease_ttl_s must be in [0.3, 3600], timeout_s in (0, 30]")

    def url(self) -> str:
        if self.redis_url is not None:
            return self.redis_url
        url = os.environ.get(self.redis_url_env or "", "")
        if not url:
            raise ValueError(f"shared_state.redis_url_env: {self.redis_url_env} is not set")
        return url


class Down(Exception):
    """Redis did not answer; the caller falls back."""


class RedisQuotas:
    """The Quotas (policies/quotas.py) of every gateway process sharing one Redis."""

    shared = True

    def __init__(self, cfg: SharedStateConfig, local_processes: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 process_id: str | None = None) -> None:
        """`local_processes`: this pod's worker count, the process count until Redis told one."""
        self.cfg = cfg
        self.clock = clock
        self.book = LocalBook(clock)  # the fallback while Redis is down
        self.process_id = f"{process_id or socket.gethostname()}:{secrets.token_hex(4)}"
        self.processes = max(1, local_processes)  # live gateway processes, last known
        self.up = True
        self.fallbacks = dict.fromkeys(ON_UNAVAILABLE, 0)  # decisions taken while down
        self.errors = 0  # round trips that failed
        self._client: RedisClient | None = None
        self._scripts: dict[str, str] = {}  # name -> Lua
        self._next_probe = 0.0
        self._held: dict[str, list[str]] = {}  # lease -> its scopes' sorted sets (renewed)
        self._ids = itertools.count()
        self._released = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # the fleet's replica bindings, read at each heartbeat (policies/routing.py's Router)
        self.on_affinity: Callable[[dict[str, str]], None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = RedisClient(self.cfg.url(), connect_timeout=self.cfg.timeout_s)
        for name in ("RATE", "ACQUIRE", "ADMIT", "FINISH", "RENEW", "RELEASE", "HEARTBEAT"):
            self._scripts[name] = getattr(redis_scripts, name)
        await self._beat()
        self._loop = asyncio.create_task(self._keepalive())

    async def aclose(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._pending:
            await asyncio.wait(self._pending, timeout=self.cfg.timeout_s * 2)
        with contextlib.suppress(Down):
            await self._redis(self._script("HEARTBEAT", [self._key("procs")],
                                           [self.process_id, 0, "1"]))
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def _keepalive(self) -> None:
        """Heartbeat and lease renewal every lease_ttl_s / 3; a probe a second while down."""
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s / 3 if self.up else PROBE_S)
            try:
                await self._beat()
            except Exception:
                log.exception("shared state: heartbeat failed")

    async def _beat(self) -> None:
        ttl_ms = int(self.cfg.lease_ttl_s * 1000)
        with contextlib.suppress(Down):
            self.processes = max(1, int(await self._redis(self._script(
                "HEARTBEAT", [self._key("procs")], [self.process_id, ttl_ms, "0"]))))
            for lease, keys in list(self._held.items()):
                await self._redis(self._script("RENEW", keys, [lease, ttl_ms]))
            if self.on_affinity is not None:
                flat = await self._call("HGETALL", self._key("affinity"))
                self.on_affinity({flat[i].decode(): flat[i + 1].decode()
                                  for i in range(0, len(flat), 2)})

    # ---- replica affinity ---------------------------------------------------------------

    def publish_affinity(self, key: str, replica: str) -> None:
        """A binding this process made ("model:adapter" -> replica), for the others (who read
        them at their next heartbeat); sent in a task: routing does not wait for it."""
        task = asyncio.ensure_future(self._publish(key, replica))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, key: str, replica: str) -> None:
        with contextlib.suppress(Down):
            await self._call("HSET", self._key("affinity"), key, replica)

    async def _call(self, *args: object) -> Any:
        client = self._client
        if client is None:
            raise Down
        return await self._redis(lambda: client.call(*args, timeout=self.cfg.timeout_s))

    # ---- Redis, or the fallback ---------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.cfg.key_prefix}{name}"

    def _script(self, name: str, keys: Sequence[str], args: Sequence[object]) -> Callable[[], Awaitable[Any]]:
        lua, client = self._scripts[name], self._client
        if client is None:
            raise RuntimeError("shared state used before start()")
        timeout = self.cfg.timeout_s
        return lambda: client.script(lua, list(keys), list(args), timeout)

    async def _redis(self, call: Callable[[], Awaitable[T]]) -> T:
        """One round trip; Down when Redis cannot answer (then not tried again for PROBE_S)."""
        if not self.up and self.clock() < self._next_probe:
            raise Down
        try:
            result = await call()  # each call carries its own timeout (timeout_s)
        except RedisError as exc:
            if not str(exc).startswith(UNAVAILABLE_ERRORS):
                raise  # a script's error: a bug, not an outage
            self._down(exc)
            raise Down from None
        except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            self._down(exc)
            raise Down from None
        if not self.up:
            log.warning("shared state: Redis answers again")
        self.up = True
        return result

    def _down(self, exc: BaseException) -> None:
        self.errors += 1
        if self.up:
            log.warning("shared state: Redis unavailable (%s); %s until it answers",
                        type(exc).__name__, self.cfg.on_unavailable)
        self.up = False
        self._next_probe = self.clock() + PROBE_S

    async def run(self, name: str, keys: Sequence[str], args: Sequence[object]) -> Any:
        """One registered script in one round trip; Down when Redis cannot answer."""
        return await self._redis(self._script(name, keys, args))

    def register(self, name: str, lua: str) -> None:
        """Another module's script (policies/shared_residency.py), run by name."""
        self._scripts.setdefault(name, lua)

    def hold(self, lease: str, sorted_sets: list[str]) -> None:
        """Renew `lease` in these sorted sets with the others, until forget()."""
        self._held[lease] = sorted_sets

    def forget(self, lease: str) -> None:
        self._held.pop(lease, None)

    def key(self, name: str) -> str:
        return self._key(name)

    def fallback(self) -> None:
        self._fallback()

    def _fallback(self) -> None:
        """Count a decision taken without Redis; `reject` refuses it."""
        self.fallbacks[self.cfg.on_unavailable] += 1
        if self.cfg.on_unavailable == "reject":
            raise Unavailable("The gateway's shared state is unavailable; retry shortly.",
                              code="shared_state_unavailable", retry_after=1)

    def _share(self, limit: float) -> float:
        return limit / self.processes

    # ---- the Quotas interface -----------------------------------------------------------

    async def take(self, buckets: Sequence[Bucket]) -> float:
        args: list[object] = ["take"]
        for b in buckets:
            args += [b.per_minute, b.amount]
        try:
            ok, wait_us = await self._redis(self._script(
                "RATE", [self._key(b.key) for b in buckets], args))
            return 0.0 if int(ok) else int(wait_us) / 1e6
        except Down:
            self._fallback()
            return self.book.take([replace(b, per_minute=self._share(b.per_minute)) for b in buckets])

    async def settle(self, buckets: Sequence[Bucket]) -> None:
        args: list[object] = ["settle"]
        for b in buckets:
            args += [b.per_minute, b.amount]
        try:
            await self._redis(self._script("RATE", [self._key(b.key) for b in buckets], args))
        except Down:
            self.book.settle([replace(b, per_minute=self._share(b.per_minute)) for b in buckets])

    def new_lease(self) -> str:
        return f"{self.process_id}:{next(self._ids)}"

    def _scope_keys(self, scopes: Sequence[Scope]) -> list[str]:
        keys: list[str] = []
        for s in scopes:
            keys += [self._key(f"lease:{s.key}"), self._key(f"amount:{s.key}")]
        return keys

    async def acquire(self, lease: str, scopes: Sequence[Scope]) -> int:
        ttl_ms = int(self.cfg.lease_ttl_s * 1000)
        args: list[object] = [lease, ttl_ms]
        for s in scopes:
            args += [s.limit, s.amount]
        keys = self._scope_keys(scopes)
        try:
            reply = await self._redis(self._script("ACQUIRE", keys, args))
        except Down:
            self._fallback()
            local = [replace(s, limit=int(self._share(s.limit))) for s in scopes]
            return self.book.acquire(lease, local, math.inf)  # held until released here
        failed = int(reply[0]) - 1
        if failed < 0:
            self._held[lease] = keys[::2]
        return failed

    async def release(self, lease: str, scopes: Sequence[Scope]) -> None:
        """Forgets the lease at once (no more renewals) and drops it in Redis: the command is
        written before this can be cancelled (policies/redis_client.py), so a cancelled caller
        still releases it; if Redis is down (or the connection is being made), it expires."""
        keys = self._held.pop(lease, None)
        self.book.release(lease, [s.key for s in scopes])
        self._released.set()
        self._released = asyncio.Event()
        if keys is None:
            return
        with contextlib.suppress(Down):
            await self._redis(self._script("RELEASE", self._scope_keys(scopes), [lease]))

    async def admit(self, buckets: Sequence[Bucket], lease: str,
                    scopes: Sequence[Scope]) -> tuple[float, int]:
        """take and acquire in one round trip (the common case at admission)."""
        keys = [self._key(b.key) for b in buckets]
        scope_keys = self._scope_keys(scopes)
        args: list[object] = [len(buckets), lease, int(self.cfg.lease_ttl_s * 1000)]
        for b in buckets:
            args += [b.per_minute, b.amount]
        for sc in scopes:
            args += [sc.limit, sc.amount]
        try:
            reply = await self._redis(self._script("ADMIT", keys + scope_keys, args))
        except Down:
            self._fallback()
            wait = self.book.take([replace(b, per_minute=self._share(b.per_minute)) for b in buckets])
            if wait > 0 or not scopes:
                return wait, -1
            local = [replace(sc, limit=int(self._share(sc.limit))) for sc in scopes]
            return 0.0, self.book.acquire(lease, local, math.inf)
        if not int(reply[0]):
            return int(reply[1]) / 1e6, -1
        if not scopes:
            return 0.0, -1
        failed = int(reply[1]) - 1
        if failed < 0:
            self._held[lease] = scope_keys[::2]
        return 0.0, failed

    async def finish(self, buckets: Sequence[Bucket], lease: str, scopes: Sequence[Scope]) -> None:
        """release and settle in one round trip (cancellation: see release)."""
        keys = self._held.pop(lease, None)
        self.book.release(lease, [sc.key for sc in scopes])
        self._released.set()
        self._released = asyncio.Event()
        scope_keys = self._scope_keys(scopes) if keys is not None else []
        if not scope_keys and not buckets:
            return
        args: list[object] = [len(buckets), lease]
        for b in buckets:
            args += [b.per_minute, b.amount]
        keys = [self._key(b.key) for b in buckets] + scope_keys
        try:
            await self._redis(self._script("FINISH", keys, args))
        except Down:
            self.book.settle([replace(b, per_minute=self._share(b.per_minute)) for b in buckets])

    async def changed(self, timeout: float) -> None:
        await wait_event(self._released, timeout)

    # ---- for telemetry ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"up": self.up, "processes": self.processes, "fallbacks": dict(self.fallbacks),
                "errors": self.errors, "leases_held": len(self._held),
                "on_unavailable": self.cfg.on_unavailable, "process_id": self.process_id}
