"""Which LoRA adapters a remote server (vLLM) holds, within a byte budget.

Plain Python over two async callables, so it is tested without a server:
- `acquire(name)` makes sure `name` is loaded and pins it; `release(name)` unpins it.
- One load per adapter however many requests ask at once (they share one future).
- When the budget is full, the least recently used adapter that no request pins is unloaded;
  if every resident adapter is pinned, `acquire` waits for a release (never over budget).
- With a fleet residency (gateway/core/residency.py; `shared_state` configured), every
  gateway process decides together: the fleet says hit, load (after unloading its victims)
  or wait, pins are the fleet's, and no process unloads what a request elsewhere holds.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from gateway.core.errors import BackendError
from gateway.core.residency import AdapterResidency

FLEET_POLL_S = (0.02, 0.25)  # back-off while the fleet says wait


class RemoteAdapters:
    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[str], Awaitable[None]],
        unload: Callable[[str], Awaitable[None]],
        size_of: Callable[[str], int | None],
    ) -> None:
        self.budget_bytes = budget_bytes
        self._load = load
        self._unload = unload
        self._size_of = size_of
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, LRU first
        self._pins: dict[str, int] = {}
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._changed = asyncio.Condition()
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self.fleet: AdapterResidency | None = None  # set by share(); None: this process decides
        self.server = ""  # the fleet's name for the server (the backend's URL)
        self._fleet_pins: dict[str, list[str]] = {}  # adapter -> this process's pins

    def share(self, fleet: AdapterResidency, server: str) -> None:
        self.fleet, self.server = fleet, server

    @property
    def resident(self) -> dict[str, int]:
        if self.fleet is not None:
            return self.fleet.resident(self.server)
        return dict(self._resident)

    @property
    def used_bytes(self) -> int:
        return sum(self._resident.values()) + sum(
            self._size_of(n) or 0 for n in self._loading if n not in self._resident)

    async def acquire(self, name: str) -> None:
        size = self._size_of(name)
        if size is None:
            raise BackendError(f"adapter {name!r} is not known to this backend", 404, "adapter_not_found")
        if size > self.budget_bytes:
            raise BackendError(f"adapter {name!r} ({size} bytes) exceeds the adapter budget "
                               f"({self.budget_bytes} bytes)", 503, "adapter_cache_full")
        if self.fleet is not None:
            await self._acquire_in_fleet(self.fleet, name, size)
            return
        self._pins[name] = self._pins.get(name, 0) + 1
        try:
            await self._ensure(name, size)
        except BaseException:
            await self.release(name)
            raise

    async def _acquire_in_fleet(self, fleet: AdapterResidency, name: str, size: int) -> None:
        pin = fleet.new_pin()
        delay = FLEET_POLL_S[0]
        while True:
            answer = await fleet.pin(self.server, name, size, self.budget_bytes, pin)
            if answer.action == "hit":
                self.hits += 1
                break
            if answer.action == "load":
                try:
                    for victim in answer.victims:
                        await self._unload(victim)
                        self.evictions += 1
                        await fleet.unloaded(self.server, victim)
                    await self._load(name)
                except BaseException:
                    await fleet.loaded(self.server, name, ok=False)
                    await fleet.unpin(self.server, name, pin)
                    raise
                await fleet.loaded(self.server, name, ok=True)
                self.loads += 1
                break
            await asyncio.sleep(delay)  # loading elsewhere, or the budget is pinned
            delay = min(delay * 2, FLEET_POLL_S[1])
        self._fleet_pins.setdefault(name, []).append(pin)

    async def _ensure(self, name: str, size: int) -> None:
        while True:
            if name in self._resident:
                self._resident.move_to_end(name)
                self.hits += 1
                return
            pending = self._loading.get(name)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            async with self._changed:
                while name not in self._resident and name not in self._loading:
                    if await self._make_room(size):
                        break
                    await self._changed.wait()
            if name in self._resident or name in self._loading:
                continue
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._loading[name] = future
            try:
                await self._load(name)
            except BaseException as exc:
                future.set_exception(exc if isinstance(exc, Exception) else BackendError("load cancelled"))
                future.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            else:
                self._resident[name] = size
                self.loads += 1
                future.set_result(None)
                return
            finally:
                del self._loading[name]
                async with self._changed:
                    self._changed.notify_all()

    async def _make_room(self, size: int) -> bool:
        """Unload LRU unpinned adapters until `size` fits; False if it cannot fit now."""
        while self.used_bytes + size > self.budget_bytes:
            victim = next((n for n in self._resident if self._pins.get(n, 0) == 0), None)
            if victim is None:
                return False
            del self._resident[victim]
            self.evictions += 1
            await self._unload(victim)
        return True

    async def release(self, name: str) -> None:
        pins = self._fleet_pins.get(name)
        if self.fleet is not None and pins:
            await self.fleet.unpin(self.server, name, pins.pop())
            return
        left = self._pins.get(name, 0) - 1
        if left > 0:
            self._pins[name] = left
        else:
            self._pins.pop(name, None)
        async with self._changed:
            self._changed.notify_all()
