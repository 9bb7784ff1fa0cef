"""The fleet's adapter residency on shared servers (vLLM), in Redis (gateway/core/residency.py
says what it promises). One atomic script decides each pin; every pin is a lease renewed with
the request's other leases (policies/redis_quotas.py) and expires with a dead process.

Per server S, under the key prefix: `res:S` (adapter -> bytes, resident or loading),
`state:S` (adapter -> "ready" | "loading:<expiry ms>" | "unloading:<expiry ms>"), `lru:S`
(adapter -> last use), `pin:S:<adapter>` (pin -> expiry). A "loading" or "unloading" marker
whose process died expires after LOAD_TTL_MS and the adapter is forgotten (vLLM's own answer
to a second load, "already loaded", is accepted).

Redis down: the same decisions are taken in this process (LocalResidency, the scripts'
reference) with the budget divided by the live processes, as the other shared limits are.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

from gateway.core.residency import PinAnswer
from policies.redis_quotas import Down, RedisQuotas

LOAD_TTL_MS = 180_000  # how long a load or unload may take before its marker is given up

# KEYS: res, state, lru. ARGV: adapter, size, budget, pin, ttl ms, the pins' key prefix,
# LOAD_TTL_MS. Returns {"hit"}, {"wait"} or {"load", victims...}.
_PIN = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local res, st, lru = KEYS[1], KEYS[2], KEYS[3]
local adapter, size, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local pin, ttl, prefix, load_ttl = ARGV[4], tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local states = redis.call('HGETALL', st)
for i = 1, #states, 2 do
  local exp = tonumber(string.match(states[i + 1], ':(%d+)$') or '')
  if exp and exp <= now_ms then
    redis.call('HDEL', st, states[i])
    redis.call('HDEL', res, states[i])
    redis.call('ZREM', lru, states[i])
  end
end
local function pins(name)
  redis.call('ZREMRANGEBYSCORE', prefix .. name, '-inf', now_ms)
  return redis.call('ZCARD', prefix .. name)
end
local state = redis.call('HGET', st, adapter)
if state == 'ready' then
  redis.call('ZADD', prefix .. adapter, now_ms + ttl, pin)
  redis.call('ZADD', lru, now_ms, adapter)
  return {'hit'}
end
if state then
  return {'wait'}
end
local used = 0
local sizes = redis.call('HVALS', res)
for _, v in ipairs(sizes) do used = used + tonumber(v) end
local victims = {}
if used + size > budget then
  for _, name in ipairs(redis.call('ZRANGE', lru, 0, -1)) do
    if used + size <= budget then break end
    if redis.call('HGET', st, name) == 'ready' and pins(name) == 0 then
      used = used - tonumber(redis.call('HGET', res, name) or '0')
      table.insert(victims, name)
    end
  end
  if used + size > budget then
    return {'wait'}
  end
  for _, name in ipairs(victims) do
    redis.call('HSET', st, name, 'unloading:' .. (now_ms + load_ttl))
    redis.call('HDEL', res, name)
    redis.call('ZREM', lru, name)
  end
end
redis.call('HSET', st, adapter, 'loading:' .. (now_ms + load_ttl))
redis.call('HSET', res, adapter, size)
redis.call('ZADD', lru, now_ms, adapter)
redis.call('ZADD', prefix .. adapter, now_ms + ttl, pin)
local answer = {'load'}
for _, name in ipairs(victims) do table.insert(answer, name) end
return answer
"""

# KEYS: res, state, lru, the adapter's pins. ARGV: adapter, "ok" | "failed" | "unloaded", pin.
# Returns the adapters now ready (resident).
_DONE = """
local res, st, lru, pins = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local adapter, what = ARGV[1], ARGV[2]
local state = redis.call('HGET', st, adapter) or ''
if what == 'ok' and string.sub(state, 1, 8) == 'loading:' then
  redis.call('HSET', st, adapter, 'ready')
elseif what == 'failed' and string.sub(state, 1, 8) == 'loading:' then
  redis.call('HDEL', st, adapter)
  redis.call('HDEL', res, adapter)
  redis.call('ZREM', lru, adapter)
  redis.call('ZREM', pins, ARGV[3])
elseif what == 'unloaded' and string.sub(state, 1, 10) == 'unloading:' then
  redis.call('HDEL', st, adapter)
end
local ready = {}
local states = redis.call('HGETALL', st)
for i = 1, #states, 2 do
  if states[i + 1] == 'ready' then table.insert(ready, states[i]) end
end
return ready
"""


_UNPIN = """
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


@dataclass
class _Server:
    sizes: dict[str, int] = field(default_factory=dict)  # resident or loading
    state: dict[str, str] = field(default_factory=dict)  # "ready" | "loading" | "unloading"
    lru: dict[str, int] = field(default_factory=dict)  # adapter -> use order
    pins: dict[str, set[str]] = field(default_factory=dict)


class LocalResidency:
    """The pin decisions in one process (the fallback, and the script's reference)."""

    def __init__(self) -> None:
        self.servers: dict[str, _Server] = {}
        self._use = itertools.count()

    def pin(self, server: str, adapter: str, size: int, budget: int, pin: str) -> PinAnswer:
        s = self.servers.setdefault(server, _Server())
        state = s.state.get(adapter)
        if state == "ready":
            s.pins.setdefault(adapter, set()).add(pin)
            s.lru[adapter] = next(self._use)
            return PinAnswer("hit")
        if state is not None:
            return PinAnswer("wait")
        used = sum(s.sizes.values())
        victims: list[str] = []
        for name in sorted(s.lru, key=s.lru.__getitem__):
            if used + size <= budget:
                break
            if s.state.get(name) == "ready" and not s.pins.get(name):
                used -= s.sizes.get(name, 0)
                victims.append(name)
        if used + size > budget:
            return PinAnswer("wait")
        for name in victims:
            s.state[name] = "unloading"
            s.sizes.pop(name, None)
            s.lru.pop(name, None)
        s.state[adapter] = "loading"
        s.sizes[adapter] = size
        s.lru[adapter] = next(self._use)
        s.pins.setdefault(adapter, set()).add(pin)
        return PinAnswer("load", tuple(victims))

    def done(self, server: str, adapter: str, what: str, pin: str = "") -> None:
        s = self.servers.setdefault(server, _Server())
        state = s.state.get(adapter, "")
        if what == "ok" and state == "loading":
            s.state[adapter] = "ready"
        elif what == "failed" and state == "loading":
            for table in (s.state, s.sizes, s.lru):
                table.pop(adapter, None)
            s.pins.get(adapter, set()).discard(pin)
        elif what == "unloaded" and state == "unloading":
            del s.state[adapter]

    def unpin(self, server: str, adapter: str, pin: str) -> None:
        self.servers.setdefault(server, _Server()).pins.get(adapter, set()).discard(pin)

    def resident(self, server: str) -> dict[str, int]:
        s = self.servers.get(server)
        if s is None:
            return {}
        return {n: s.sizes[n] for n, st in s.state.items() if st == "ready" and n in s.sizes}


class SharedResidency:
    """gateway/core/residency.py's AdapterResidency over a RedisQuotas's Redis."""

    def __init__(self, shared: RedisQuotas) -> None:
        self.shared = shared
        self.local = LocalResidency()  # while Redis is down
        self._resident: dict[str, dict[str, int]] = {}
        self._sizes: dict[tuple[str, str], int] = {}

    def _keys(self, server: str) -> list[str]:
        k = self.shared.key
        return [k(f"res:{server}"), k(f"state:{server}"), k(f"lru:{server}")]

    def _pin_key(self, server: str, adapter: str) -> str:
        return self.shared.key(f"pin:{server}:{adapter}")

    def _register(self) -> None:
        self.shared.register("PIN", _PIN)
        self.shared.register("PIN_DONE", _DONE)
        self.shared.register("UNPIN", _UNPIN)

    def new_pin(self) -> str:
        return self.shared.new_lease()

    async def pin(self, server: str, adapter: str, size: int, budget: int, pin: str) -> PinAnswer:
        self._register()
        self._sizes[(server, adapter)] = size
        ttl_ms = int(self.shared.cfg.lease_ttl_s * 1000)
        args = [adapter, size, budget, pin, ttl_ms, self._pin_key(server, ""), LOAD_TTL_MS]
        try:
            reply = await self.shared.run("PIN", self._keys(server), args)
        except Down:
            self.shared.fallback()
            local = math.floor(budget / self.shared.processes)
            return self.local.pin(server, adapter, size, local, pin)
        action = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if action in ("hit", "load"):
            self.shared.hold(pin, [self._pin_key(server, adapter)])  # renewed as a lease
        victims = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:])
        return PinAnswer(action, victims)  # type: ignore[arg-type]

    async def _done(self, server: str, adapter: str, what: str, pin: str = "") -> None:
        self._register()
        keys = [*self._keys(server), self._pin_key(server, adapter)]
        try:
            ready = await self.shared.run("PIN_DONE", keys, [adapter, what, pin])
        except Down:
            self.local.done(server, adapter, what, pin)
            return
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in ready]
        self._resident[server] = {n: self._sizes.get((server, n), 0) for n in names}

    async def loaded(self, server: str, adapter: str, ok: bool) -> None:
        await self._done(server, adapter, "ok" if ok else "failed")

    async def unloaded(self, server: str, adapter: str) -> None:
        await self._done(server, adapter, "unloaded")

    async def unpin(self, server: str, adapter: str, pin: str) -> None:
        self.shared.forget(pin)
        self.local.unpin(server, adapter, pin)
        self._register()
        with contextlib.suppress(Down):  # else it expires within lease_ttl_s
            await self.shared.run("UNPIN", [self._pin_key(server, adapter)], [pin])

    def resident(self, server: str) -> dict[str, int]:
        if not self.shared.up:
            return self.local.resident(server)
        return dict(self._resident.get(server, {}))
