"""API key -> tenant. Keys are held only as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable

from gateway.core.config import TenantConfig
from gateway.core.errors import AuthenticationFailed, PermissionDenied

REDACTED = "[redacted]"
MIN_EMBEDDED_KEY = 8  # a key inside other text is looked for in words at least this long
# what a key is made of: RFC 7235's token68 characters, and the narrower word characters (so
# "key=sk-..." and "sk-...," give the key), besides whitespace-separated words
_TOKEN68 = re.compile(rf"[A-Za-z0-9_\-.~+/=]{{{MIN_EMBEDDED_KEY},}}")
_WORD = re.compile(rf"[A-Za-z0-9_\-]{{{MIN_EMBEDDED_KEY},}}")
_PUNCTUATION = "\"'`,;:()[]{}<>"


def redact_keys(text: str, is_key: Callable[[str], bool]) -> str:
    """`text` with each of the gateway's keys in it replaced by "[redacted]": the whole text
    when it is a key (alone, or after a Bearer scheme in any case), else every word of it that
    is one (split at whitespace, quotes and punctuation, and at characters no bearer key
    holds). Only the keys' digests are held, so a key is found as a whole word: one glued to
    more key characters ("xsk-...") is not, nor a key under 8 characters inside other text."""
    whole = text.strip()
    if whole[:6].lower() == "bearer" and whole[6:7].isspace():
        whole = whole[6:].lstrip()
    if is_key(whole):
        return REDACTED
    words = {w.strip(_PUNCTUATION) for w in text.split() if len(w) >= MIN_EMBEDDED_KEY}
    words.update(_TOKEN68.findall(text))
    words.update(_WORD.findall(text))
    for word in sorted((w for w in words if w and is_key(w)), key=len, reverse=True):
        text = text.replace(word, REDACTED)
    return text


class TenantDirectory:
    def __init__(self, tenants: tuple[TenantConfig, ...]) -> None:
        self._entries = [(digest, t) for t in tenants for digest in t.key_hashes()]
        self.by_name = {t.name: t for t in tenants}
        self._digests = frozenset(digest for digest, _ in self._entries)

    def fingerprint(self) -> bytes:
        """A digest of which key digests belong to which tenant (part of the config version:
        a key rotated in a keys file changes it); reveals no key."""
        h = hashlib.sha256()
        for digest, tenant in sorted((d, t.name) for d, t in self._entries):
            h.update(tenant.encode() + b"\0" + digest)
        return h.digest()

    def is_key(self, value: str) -> bool:
        """`value` is one of the tenants' keys (usage records redact such a value)."""
        return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest() in self._digests

    def authenticate(self, authorization: str | None) -> TenantConfig:
        """The tenant owning the bearer key, or AuthenticationFailed. Never echoes the key."""
        if not authorization:
            raise AuthenticationFailed(
                "Missing API key. Send 'Authorization: Bearer YOUR_KEY'.", code="missing_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: TenantConfig | None = None
        for candidate, tenant in self._entries:  # no early exit: time does not depend on position
            if hmac.compare_digest(candidate, digest):
                found = tenant
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return found


class AdminKey:
    """The operator's key for admin endpoints, read from the env variable the config names."""

    def __init__(self, env_name: str | None) -> None:
        key = os.environ.get(env_name, "") if env_name else ""
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def is_key(self, value: str) -> bool:
        return self._digest is not None and hmac.compare_digest(
            hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest(), self._digest)

    def authenticate(self, authorization: str | None) -> None:
        if self._digest is None:
            raise PermissionDenied("Admin endpoints are disabled: set server.admin_api_key_env.")
        scheme, _, key = (authorization or "").partition(" ")
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._digest):
            raise AuthenticationFailed("This endpoint needs the admin API key.")
