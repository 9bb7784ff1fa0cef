"""What the remote kinds share: how an adapter is named upstream, and what a backend over
someone else's server reports when that server tells it nothing."""

from __future__ import annotations

from gateway.core.backend import BackendStats, Capacity, MemorySnapshot
from gateway.core.context import RequestContext


def adapter_name(fmt: str, model: str, adapter: str) -> str:
    """A remote kind's name for `adapter` on `model`: its `adapter_model` format over {model}
    and {adapter} ("{model}:{adapter}" -> "m:a" for another memgate, "{adapter}" for vLLM,
    "openai/{model}:{adapter}" for litellm). ValueError names a format that is not one."""
    try:
        return fmt.format(model=model, adapter=adapter)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"adapter_model {fmt!r} is not a format over {{model}} and {{adapter}} ({exc})"
        ) from None


class RemoteBackend:
    """What a backend over someone else's server reports when that server tells it nothing:
    no token counts, capacity, adapter list, memory, counters or adapter loading of its own.
    Kinds that know more (vllm) override the methods they can answer."""

    def forwards(self, kind: str) -> bool:
        return True  # the client's request goes upstream as sent

    def count_tokens(self, ctx: RequestContext) -> int | None:
        return None

    def capacity(self) -> Capacity | None:
        return None

    def adapters(self) -> dict[str, int] | None:
        return None  # the upstream decides; adapter names pass through unchecked

    def memory(self) -> MemorySnapshot:
        return MemorySnapshot()

    def stats(self) -> BackendStats:
        return BackendStats()

    async def ensure_adapter(self, name: str) -> None:
        return None

    def available(self) -> bool:
        return True
