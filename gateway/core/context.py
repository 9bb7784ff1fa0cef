"""The request as it travels through policies and into a backend."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

Prompt = str | list[str] | list[int] | list[list[int]]
# The field that carries a tenant's max_output_tokens upstream, by request kind.
LIMIT_FIELD = {"chat": "max_completion_tokens", "completion": "max_tokens",
               "responses": "max_output_tokens"}


@dataclass(slots=True)
class SamplingParams:
    """What the gateway itself reads of a generation request (OpenAI names and meanings).

    Remote kinds forward the client's body as sent (ctx.body), so these are read for the
    policies and the telemetry; the local engine reads the rest of its fields from ctx.body
    (backends/local/request.py)."""

    max_tokens: int | None = None  # None: the client named no limit (see policies/demand.py)
    n: int = 1  # choices asked for (admission reserves for each)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (prompt_tokens_details)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


@dataclass(slots=True)
class Chunk:
    """One piece of a generation. The last chunk carries finish_reason and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | None while generating
    usage: Usage | None = None
    index: int = 0  # the choice this chunk belongs to (n > 1, lists of prompts)
    ended: str | None = None  # choice `index` ended with this reason (not the last chunk)
    logprobs: list[dict[str, Any]] | None = None  # chat-shaped entries of this chunk's tokens
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI tool-call deltas
    # A remote kind's answer, passed through: one upstream event (streaming) or the whole
    # answer (JSON), as the upstream sent it; writers only rename `model` (gateway/sse.py).
    event: dict[str, Any] | None = None
    # True: the backend already holds the next chunk (they arrived together), so a streaming
    # response may write both at once: one socket write per arrival instead of per chunk.
    more: bool = field(default=False, compare=False)


@dataclass(slots=True)
class RequestMemory:
    """Memory a request causes; filled by the backend, read by telemetry."""

    kv_bytes_reserved: int = 0
    kv_bytes_peak: int = 0
    kv_bytes_peak_share: int = 0  # its share of the peak: a block k sequences share counts 1/k
    adapter: str | None = None
    adapter_bytes: int = 0
    workspace_bytes: int = 0  # the request's largest share of one step's activations
    queue_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What one policy did to one request; telemetry reads ctx.decisions."""

    policy: str
    action: str  # "pass" | "modify" | "reject"
    reason: str = ""
    status: int = 200


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds (policies/admission.py) until it finishes."""

    backend: str
    tenant: str
    kv_bytes: int
    tokens: int = 0
    adapter: str | None = None
    adapter_bytes: int = 0
    released: bool = False
    long: bool = False  # in the long lane of a backend with length lanes


@dataclass(slots=True)
class RequestContext:
    """Everything known about one request. `kind`: "chat", "completion", "responses" (a
    Responses API request a backend serves natively) or "embeddings"."""

    request_id: str
    tenant: str
    kind: str
    requested_model: str
    target_model: str
    backend: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, Any]] | None = None  # as the client sent them (context_trim drops some)
    prompt: Prompt | None = None  # a completion's prompt: text, token ids, or a list of either
    adapter: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None  # the client's `metadata`, bounded (usage records)
    body: dict[str, Any] = field(default_factory=dict)  # the client's JSON body, as sent
    output_cap: int | None = None  # the tenant's max_output_tokens, when it filled in the limit
    via_chat: bool = False  # a Responses request served over chat (gateway/responses_api.py answers)
    # W3C trace context (traceparent, tracestate) of the request's span, for upstream calls
    trace_headers: dict[str, str] = field(default_factory=dict)
    # set while spans are recorded: a backend's upstream calls get client spans from it
    tracer: Tracer | None = None
    created: float = field(default_factory=time.time)
    deadline: float | None = None
    prompt_tokens: int | None = None
    decisions: list[Decision] = field(default_factory=list)
    memory: RequestMemory = field(default_factory=RequestMemory)
    # Set by the policy chain (policies/): read by response headers and telemetry.
    requested_adapter: str | None = None  # from `model: "base:adapter"`
    degraded_from: str | None = None  # the model asked for, when degrade routed elsewhere
    failed_backends: list[str] = field(default_factory=list)  # failed it before its first byte
    fell_back_to_tier: bool = False  # served by a smaller tier after a failure (once at most)
    trimmed_tokens: int = 0  # prompt tokens context_trim removed
    queue_seconds: float = 0.0  # time spent waiting for admission in the gateway
    reservation: Reservation | None = None  # the admission policy's, while one is held
    usage: Usage | None = None  # what the backend reported on its last chunk
    inference_objective: str | None = None  # the tenant's, for a Gateway API Inference Extension
    priority: str = "normal"  # the tenant's: high | normal | low (who a backend preempts first)
    expected_tokens: int | None = None  # output tokens expected per sequence (admission's estimate)
    body_bytes: int = 0  # the request body's size: an upper bound of the prompt's UTF-8 bytes
    # tokens charged to the tenant's tokens-per-minute before the prompt was counted (the
    # provisional charge, from body_bytes; admission settles it to the exact count)
    precharged_tokens: int | None = None
    # the prompt's token ids as the backend `tokenized[0]` counted them, for the messages /
    # prompt objects it counted (identity): generation reuses them instead of tokenizing again
    tokenized: tuple[str, object, list[list[int]]] | None = None
    # -- rollouts (gateway/rollout/): a shadow copy is never billed nor counted in limits
    shadow: bool = False
    rollout: str | None = None  # the side of a rollout that serves it: primary | candidate
    rollout_backend: str | None = None  # the candidate backend routing keeps (candidate side)

    @property
    def usage_injected(self) -> bool:
        """The gateway asks a remote upstream for stream usage the client did not ask for (it
        needs it for accounting); the extra usage event is then not shown to the client."""
        return self.stream and self.kind in ("chat", "completion") and not self.include_usage


_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def request_id(incoming: bytes | None) -> str:
    """The client's x-request-id when it is sane (1-128 of A-Z a-z 0-9 . _ : -), else a new
    one: 128 random bits as hex (uuid4().hex's shape) from the process's PRNG, which costs no
    getrandom() syscall per request; ids only need to be unique, not secret."""
    if incoming and len(incoming) <= 128 and _ID_CHARS.issuperset(incoming):
        return incoming.decode()
    return f"{random.getrandbits(128):032x}"
