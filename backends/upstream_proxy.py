"""Which proxy a backend's upstream is reached through: one answer for every client of the
backend (the generation pool, the httpx control plane: health probes, adapter admin calls,
/metrics scrapes), so that a probe never takes an upstream out of rotation while direct
traffic works, or the reverse.

The rule is httpx's `trust_env`: with it (the default) HTTP_PROXY / HTTPS_PROXY / ALL_PROXY
(either case) name the proxy for the upstream URL's scheme and NO_PROXY lists the hosts
that bypass it (`*` for all); a backend with `trust_env: false` never uses one. Only http://
proxies are supported (an https:// upstream goes through one with CONNECT), which is what
HTTP(S)_PROXY names in practice; any other proxy scheme is refused at start.
"""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Proxy:
    url: str  # as configured (credentials included): what httpx is given
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, from credentials in the URL

    def __repr__(self) -> str:  # never print the credentials
        return f"Proxy(http://{self.host}:{self.port})"


def proxy_for(url: str, trust_env: bool) -> Proxy | None:
    """The proxy for requests to `url` by the environment, or None (direct)."""
    if not trust_env:
        return None
    target = urlsplit(url)
    if urllib.request.proxy_bypass_environment(target.hostname or ""):  # type: ignore[attr-defined]
        return None
    proxies = urllib.request.getproxies_environment()
    raw = proxies.get(target.scheme) or proxies.get("all")
    if not raw:
        return None
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"proxy {parts.scheme}://{parts.hostname or ''} for {target.scheme} "
                         "upstreams is not supported: use an http:// proxy or trust_env: false")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return Proxy(raw, parts.hostname, parts.port or 80, authorization)
