"""The request as it travels through policies and into a backend."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SamplingParams:
    """Sampling knobs shared by every backend (OpenAI names and meanings)."""

    max_tokens: int = 256
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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(slots=True)
class Chunk:
    """One piece of a generation. The last chunk carries finish_reason and usage."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | None while generating
    usage: Usage | None = None
    # True: the backend already holds the next chunk (they arrived together), so a streaming
    # response may write both at once: one socket write per arrival instead of per chunk.
    more: bool = field(default=False, compare=False)


@dataclass(slots=True)
class RequestMemory:
    """Memory a request causes; filled by the backend, read by telemetry."""

    kv_bytes_reserved: int = 0
    kv_bytes_peak: int = 0
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


@dataclass(slots=True)
class RequestContext:
    """Everything known about one request. `kind` is "chat" or "completion"."""

    request_id: str
    tenant: str
    kind: str
    requested_model: str
    target_model: str
    backend: str
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    adapter: str | None = None
    user: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    # W3C trace context (traceparent, tracestate) of the request's span, for upstream calls
    trace_headers: dict[str, str] = field(default_factory=dict)
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


_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def request_id(incoming: bytes | None) -> str:
    """The client's x-request-id when it is sane (1-128 of A-Z a-z 0-9 . _ : -), else a new
    one: 128 random bits as hex (uuid4().hex's shape) from the process's PRNG, which costs no
    getrandom() syscall per request; ids only need to be unique, not secret."""
    if incoming and len(incoming) <= 128 and _ID_CHARS.issuperset(incoming):
        return incoming.decode()
    return f"{random.getrandbits(128):032x}"
