"""LoRA adapters in three tiers under one byte budget, least recently used evicted first.

Tiers: device (installed in one of `max_slots` LoRA slots, usable by the engine), host (tensors
loaded but in no slot; on a GPU they move to CPU memory), disk (not loaded). The byte budget
covers device + host; bytes are counted from the safetensors header *before* the read, so the
budget holds while a load is in flight. Used from the event loop only:

- `acquire(name)` loads an adapter once however many requests ask at the same time (the read
  runs in a worker thread, off the engine's step loop), promotes it to a slot, and pins it.
  When the budget or the slots are all held by pinned adapters, it waits for a `release`.
- Pinned adapters are never demoted or evicted, so a running sequence's slot stays valid.
- Making room demotes the least recently used idle device adapter to host (slot pressure) or
  evicts the least recently used idle adapter, host tier first (byte pressure).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.hf.safetensors import SafetensorsError, adapter_bytes
from backends.local.loader import CheckpointError
from backends.local.lora import AdapterError, LoraAdapter, install, load_adapter, uninstall
from backends.local.model import Llama
from backends.local.projection import lora_dtype
from gateway.core.errors import BackendError

log = logging.getLogger("backends.local.adapters")


def moved(adapter: LoraAdapter, device: torch.device) -> LoraAdapter:
    """The adapter with its tensors on `device` (itself when they already are)."""
    if all(a.device == device and b.device == device for a, b in adapter.weights.values()):
        return adapter
    weights = {m: (a.to(device), b.to(device)) for m, (a, b) in adapter.weights.items()}
    return LoraAdapter(adapter.name, adapter.config, weights, adapter.digest)


@dataclass
class Resident:
    adapter: LoraAdapter
    slot: int | None = None  # None: host tier
    pins: int = 0
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return self.adapter.nbytes

    @property
    def device_slot(self) -> int:
        """The slot of an adapter on the device (acquire() returns only those, pinned)."""
        if self.slot is None:
            raise RuntimeError(f"adapter {self.adapter.name!r} is not on the device")
        return self.slot

    @property
    def tier(self) -> str:
        return "host" if self.slot is None else "device"


@dataclass
class AdapterStats:
    loads: int = 0  # read from disk
    hits: int = 0  # acquired while already on device
    host_hits: int = 0  # acquired from the host tier (no disk read)
    joined: int = 0  # waited for another request's load of the same adapter
    demotions: int = 0  # device -> host
    evictions: int = 0  # dropped to disk
    waits: int = 0  # acquires that had to wait for a release


class AdapterCache:
    def __init__(
        self,
        model: Llama,
        adapters_dir: str | Path | None,
        budget_bytes: int,
        max_slots: int = 8,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        self.model = model
        self.dir = Path(adapters_dir) if adapters_dir is not None else None
        self.budget_bytes = budget_bytes
        self.max_slots = max_slots
        self.entries: dict[str, Resident] = {}
        self.stats = AdapterStats()
        self._elem = torch.empty((), dtype=lora_dtype(model.compute_dtype)).element_size()
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._reserved = 0  # bytes of loads in flight
        self._waiters: list[asyncio.Future[None]] = []
        self._clock = itertools.count(1)

    # ---- views -----------------------------------------------------------------------------

    @property
    def loads(self) -> int:
        return self.stats.loads

    @property
    def resident(self) -> dict[str, Resident]:
        """Adapters on the device tier (in a slot)."""
        return {n: r for n, r in self.entries.items() if r.slot is not None}

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.entries.values())

    def sizes(self) -> dict[str, int]:
        return {name: r.nbytes for name, r in self.entries.items()}

    def pinned(self) -> dict[str, int]:
        """Adapters held by running requests -> how many (empty when idle)."""
        return {name: r.pins for name, r in self.entries.items() if r.pins}

    def tiers(self) -> dict[str, str]:
        return {name: r.tier for name, r in self.entries.items()}

    def available(self) -> list[str]:
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "adapter_config.json").exists())

    def _path(self, name: str) -> Path:
        if self.dir is None or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise BackendError(f"adapter {name!r} not found", status=404, code="adapter_not_found")
        path = self.dir / name
        if not (path / "adapter_config.json").exists():
            raise BackendError(f"adapter {name!r} not found", status=404, code="adapter_not_found")
        return path

    # ---- acquire / release -----------------------------------------------------------------

    async def ensure(self, name: str) -> Resident:
        """Make `name` usable on the device (loading it once) without pinning it."""
        res = await self.acquire(name)
        self.release(name)
        return res

    async def acquire(self, name: str) -> Resident:
        """Load (once), promote to a slot, pin; waits while everything is pinned."""
        counted = fresh = False
        while True:
            res = self.entries.get(name)
            if res is not None:
                tier = res.tier
                if res.slot is None and not self._promote(res):
                    counted = await self._wait(counted)
                    continue
                if not fresh:
                    if tier == "device":
                        self.stats.hits += 1
                    else:
                        self.stats.host_hits += 1
                res.pins += 1
                res.last_used = next(self._clock)
                return res
            fut = self._loading.get(name)
            if fut is not None:
                if not fresh:
                    self.stats.joined += 1
                fresh = True  # this request waited for a disk read
                await asyncio.shield(fut)  # a failed load raises here for every waiter
                continue
            need = self._need(name)
            if not self._make_room(need):
                counted = await self._wait(counted)
                continue
            fresh = True  # this request causes a disk read
            await self._load(name, need)

    def release(self, name: str) -> None:
        res = self.entries.get(name)
        if res is not None and res.pins > 0:
            res.pins -= 1
            if res.pins == 0:
                self._notify()

    # ---- internals -------------------------------------------------------------------------

    def _need(self, name: str) -> int:
        path = self._path(name)
        try:
            need = adapter_bytes(path, self._elem)
        except (SafetensorsError, CheckpointError, OSError) as e:
            raise self._invalid(name, e) from None
        if need > self.budget_bytes:
            raise BackendError(
                f"adapter {name!r} needs {need} bytes, over the adapter cache budget "
                f"of {self.budget_bytes}",
                status=503,
                code="adapter_cache_full",
            )
        return need

    async def _load(self, name: str, need: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[name] = fut
        self._reserved += need
        try:
            adapter = await asyncio.to_thread(load_adapter, self._path(name), self.model, name)
            self.stats.loads += 1
            self.entries[name] = Resident(adapter, None, last_used=next(self._clock))
            fut.set_result(None)
        except (AdapterError, CheckpointError, OSError) as e:  # truncated, missing, wrong shape
            err = self._invalid(name, e)
            fut.set_exception(err)
            raise err from None
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.set_result(None)  # waiters retry the load themselves
            else:
                fut.set_exception(e)
            raise
        finally:
            self._reserved -= need
            self._loading.pop(name, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved
            self._notify()

    def _invalid(self, name: str, e: Exception) -> BackendError:
        """422 adapter_invalid naming the adapter; the server's directories left out."""
        log.warning("adapter %r cannot be loaded: %s", name, e)
        if isinstance(e, AdapterError | CheckpointError):  # our own words, directories left out
            detail = str(e)
            if self.dir is not None:
                detail = detail.replace(f"{self.dir / name}/", "").replace(str(self.dir / name), name)
        else:  # a library's (safetensors, torch): in the log only
            detail = "its files are missing, malformed or made for another base model."
        return BackendError(f"adapter {name!r} cannot be loaded: {detail}", status=422,
                            code="adapter_invalid")

    def _make_room(self, need: int) -> bool:
        """Evict idle adapters (host tier first, then LRU) until `need` more bytes fit."""
        while self.used_bytes + self._reserved + need > self.budget_bytes:
            idle = [
                (r.slot is not None, r.last_used, n) for n, r in self.entries.items() if r.pins == 0
            ]
            if not idle:
                return False
            self.evict(min(idle)[2])
        return True

    def _promote(self, res: Resident) -> bool:
        """Give a host-tier adapter a slot, demoting the LRU idle device adapter if needed."""
        used = {r.slot for r in self.entries.values() if r.slot is not None}
        if len(used) >= self.max_slots:
            idle = [(r.last_used, n) for n, r in self.entries.items() if r.slot and not r.pins]
            if not idle:
                return False
            victim = self.entries[min(idle)[1]]
            if victim.slot is not None:
                used.discard(victim.slot)
                uninstall(self.model, victim.slot)
                victim.slot = None
                victim.adapter = moved(victim.adapter, torch.device("cpu"))
                self.stats.demotions += 1
        slot = next(s for s in itertools.count(1) if s not in used)
        res.adapter = moved(res.adapter, self.model.device)
        install(self.model, res.adapter, slot)
        res.slot = slot
        return True

    async def _wait(self, counted: bool) -> bool:
        if not counted:
            self.stats.waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return True

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def evict(self, name: str) -> None:
        res = self.entries.get(name)
        if res is None:
            return
        if res.pins:
            raise ValueError(f"adapter {name!r} is in use")
        del self.entries[name]
        if res.slot is not None:
            uninstall(self.model, res.slot)
        self.stats.evictions += 1
