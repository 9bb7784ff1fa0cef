"""Adapter residency on a server every gateway process sends to (vLLM): which adapters it
holds, decided for the whole fleet, so that no process unloads an adapter a request
elsewhere is using and the adapter byte budget holds across processes.

A backend that loads adapters on such a server implements SharesResidency; with
`shared_state` configured the app hands it the fleet's AdapterResidency (policies/
shared_residency.py). Without it the backend decides alone (backends/remote_adapters.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class PinAnswer:
    """hit: resident, pinned. load: pinned and this caller loads it, after unloading
    `victims` (each then reported unloaded). wait: loading or unloading elsewhere, or the
    budget is held by pinned adapters: ask again shortly."""

    action: Literal["hit", "load", "wait"]
    victims: tuple[str, ...] = ()


class AdapterResidency(Protocol):
    def new_pin(self) -> str: ...

    async def pin(self, server: str, adapter: str, size: int, budget: int, pin: str) -> PinAnswer:
        """Pin `adapter` on `server` for one request (the pin expires unless renewed)."""

    async def loaded(self, server: str, adapter: str, ok: bool) -> None:
        """The caller told to load it did (ok) or failed (it is forgotten)."""

    async def unloaded(self, server: str, adapter: str) -> None:
        """A victim is gone from the server; it may be loaded again."""

    async def unpin(self, server: str, adapter: str, pin: str) -> None: ...

    def resident(self, server: str) -> dict[str, int]:
        """Adapters the server holds (the last answer seen), name -> bytes."""


@runtime_checkable
class SharesResidency(Protocol):
    """A backend whose adapters live on a server other gateway processes also use."""

    def share_residency(self, residency: AdapterResidency) -> None: ...
