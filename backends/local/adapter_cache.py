"""Adapters resident in the model, under a byte budget, least recently used evicted first.

Used from the event loop only: `acquire` loads an adapter once however many requests ask at
the same time (the read happens in a worker thread), installs it into a free slot, and pins it;
`release` unpins. Pinned adapters are never evicted, so a running sequence's slot stays valid.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from pathlib import Path

from backends.base import BackendError
from backends.local.lora import AdapterError, LoraAdapter, install, load_adapter, uninstall
from backends.local.model import Llama


@dataclass
class Resident:
    adapter: LoraAdapter
    slot: int
    pins: int = 0
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return self.adapter.nbytes


class AdapterCache:
    def __init__(self, model: Llama, adapters_dir: str | Path | None, budget_bytes: int) -> None:
        self.model = model
        self.dir = Path(adapters_dir) if adapters_dir is not None else None
        self.budget_bytes = budget_bytes
        self.resident: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Future[LoraAdapter]] = {}
        self._clock = itertools.count(1)
        self.loads = 0  # how many times an adapter was read from disk

    def available(self) -> list[str]:
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if (p / "adapter_config.json").exists())

    @property
    def used_bytes(self) -> int:
        return sum(r.nbytes for r in self.resident.values())

    def sizes(self) -> dict[str, int]:
        return {name: r.nbytes for name, r in self.resident.items()}

    def _path(self, name: str) -> Path:
        if self.dir is None or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise BackendError(f"adapter {name!r} not found", status=404, code="adapter_not_found")
        path = self.dir / name
        if not (path / "adapter_config.json").exists():
            raise BackendError(f"adapter {name!r} not found", status=404, code="adapter_not_found")
        return path

    async def ensure(self, name: str) -> Resident:
        """Make `name` resident (loading it once) without pinning it."""
        while name not in self.resident:
            fut = self._loading.get(name)
            if fut is None:
                path = self._path(name)
                fut = asyncio.get_running_loop().create_future()
                self._loading[name] = fut
                try:
                    adapter = await asyncio.to_thread(load_adapter, path, self.model, name)
                    self.loads += 1
                    self._install(adapter)
                    fut.set_result(adapter)
                except AdapterError as e:
                    err = BackendError(f"adapter {name!r}: {e}", status=422, code="adapter_invalid")
                    fut.set_exception(err)
                    raise err from None
                except asyncio.CancelledError:
                    fut.cancel()  # waiters retry the load themselves
                    raise
                except BaseException as e:
                    fut.set_exception(e)
                    raise
                finally:
                    self._loading.pop(name, None)
                    if fut.done() and not fut.cancelled():
                        fut.exception()  # mark retrieved
            else:
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    if not fut.cancelled():
                        raise  # this caller was cancelled
        res = self.resident[name]
        res.last_used = next(self._clock)
        return res

    async def acquire(self, name: str) -> Resident:
        """ensure + pin, with no await in between (so it cannot be evicted meanwhile)."""
        res = await self.ensure(name)
        res.pins += 1
        return res

    def release(self, name: str) -> None:
        res = self.resident.get(name)
        if res is not None and res.pins > 0:
            res.pins -= 1

    def _install(self, adapter: LoraAdapter) -> None:
        need = adapter.nbytes
        if need > self.budget_bytes:
            raise BackendError(
                f"adapter {adapter.name!r} needs {need} bytes, over the adapter cache budget "
                f"of {self.budget_bytes}",
                status=503,
                code="adapter_cache_full",
            )
        while self.used_bytes + need > self.budget_bytes:
            idle = [(r.last_used, n) for n, r in self.resident.items() if r.pins == 0]
            if not idle:
                raise BackendError(
                    "adapter cache is full of adapters in use",
                    status=503,
                    code="adapter_cache_full",
                )
            self.evict(min(idle)[1])
        used = {r.slot for r in self.resident.values()}
        slot = next(s for s in itertools.count(1) if s not in used)
        install(self.model, adapter, slot)
        self.resident[adapter.name] = Resident(adapter, slot, last_used=next(self._clock))

    def evict(self, name: str) -> None:
        res = self.resident.get(name)
        if res is None:
            return
        if res.pins:
            raise ValueError(f"adapter {name!r} is in use")
        del self.resident[name]
        uninstall(self.model, res.slot)
