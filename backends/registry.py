"""Backend kinds: a plain dict from the config `kind` to the class that serves it.

Classes are imported on first use so that `import gateway` never pulls torch or litellm.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKEND_KINDS: dict[str, str] = {
    "local": "backends.local.backend:LocalBackend",
    "openai": "backends.openai:OpenAIBackend",
    "vllm": "backends.vllm:VLLMBackend",
    "litellm": "backends.litellm:LiteLLMBackend",  # optional extra: pip install -e '.[litellm]'
}


def backend_class(kind: str) -> Any:
    try:
        target = BACKEND_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown backend kind {kind!r} (known: {', '.join(sorted(BACKEND_KINDS))})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
