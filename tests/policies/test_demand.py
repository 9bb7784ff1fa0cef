"""policies/demand.py: what a request reserves when it names no output limit, and for n."""

from __future__ import annotations

from gateway.core.backend import Capacity
from gateway.core.context import RequestContext, SamplingParams
from gateway.core.kv import kv_bytes_for
from policies.demand import demand, output_limit

BPT, BLOCK, WINDOW = 64, 16, 2048


def ctx(max_tokens: int | None, n: int = 1, kind: str = "chat", prompt: object = None) -> RequestContext:
    return RequestContext(request_id="r", tenant="t", kind=kind, requested_model="m",
                          target_model="m", backend="b",
                          sampling=SamplingParams(max_tokens=max_tokens, n=n),
                          prompt=prompt, prompt_tokens=100)  # type: ignore[arg-type]


class Counted:
    """A backend that counts 100 prompt tokens and reports `cap`."""

    def __init__(self, cap: Capacity | None) -> None:
        self.cap = cap

    def capacity(self) -> Capacity | None:
        return self.cap

    def count_tokens(self, c: RequestContext) -> int:
        return 100

    def adapters(self) -> dict[str, int]:
        return {}


CAP = Capacity(kv_bytes_total=1 << 30, kv_bytes_free=1 << 30, bytes_per_token=BPT,
               block_size=BLOCK, context_window=WINDOW)


def test_the_limit_or_the_context_end_or_nothing() -> None:
    assert output_limit(ctx(40), CAP, 100) == 40
    assert output_limit(ctx(None), CAP, 100) == WINDOW - 100  # local: to the context's end
    assert output_limit(ctx(None), None, 100) == 0  # remote, no capacity: nothing reserved
    assert output_limit(ctx(40, kind="embeddings"), CAP, 100) == 0


async def test_n_sequences_each_hold_prompt_and_limit() -> None:
    one = await demand(Counted(CAP), ctx(40))  # type: ignore[arg-type]
    three = await demand(Counted(CAP), ctx(40, n=3))  # type: ignore[arg-type]
    assert one.kv_bytes == kv_bytes_for(140, BLOCK, BPT)
    assert three.kv_bytes == 3 * one.kv_bytes and three.tokens == 100 + 3 * 40
    unlimited = await demand(Counted(CAP), ctx(None))  # type: ignore[arg-type]
    assert unlimited.kv_bytes == kv_bytes_for(WINDOW, BLOCK, BPT)
    remote = await demand(Counted(None), ctx(None, n=2))  # type: ignore[arg-type]
    assert remote.kv_bytes == 0 and remote.budget is None and remote.tokens == 100


async def test_a_list_of_prompts_rounds_each_sequence_up() -> None:
    listed = await demand(Counted(CAP), ctx(10, n=2, kind="completion",  # type: ignore[arg-type]
                                      prompt=["a", "b", "c"]))
    # the three prompts' 100 tokens, each + 10, each rounded to blocks: at most one more each
    assert listed.sequences == 6
    assert listed.kv_bytes >= 2 * kv_bytes_for(100 + 3 * 10, BLOCK, BPT)
    assert listed.kv_bytes <= 2 * (kv_bytes_for(130, BLOCK, BPT) + 2 * BLOCK * BPT)
