"""Backend kinds: a plain dict from the config `kind` to the class that serves it.

Classes are imported on first use so that `import gateway` never pulls torch or litellm.
"""

from __future__ import annotations

import importlib

from gateway.core.backend import Backend

BACKEND_KINDS: dict[str, str] = {
    "local": "backends.local.backend:LocalBackend",
    "openai": "backends.openai:OpenAIBackend",
    "vllm": "backends.vllm:VLLMBackend",
    "litellm": "backends.litellm:LiteLLMBackend",  # optional extra: pip install -e '.[litellm]'
}


def backend_class(kind: str) -> type[Backend]:
    try:
        target = BACKEND_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown backend kind {kind!r} (known: {', '.join(sorted(BACKEND_KINDS))})") from None
    module, _, name = target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), name)
    return cls
