"""adapter_selection: tenant default, allowed overrides, 403 for others', 404 for unknown."""

from __future__ import annotations

import pytest

from gateway.core.errors import NotFound, PermissionDenied
from policies.adapter_selection import AdapterSelection
from tests.policies.fakes import FakeBackend, ctx, make, settings

KNOWN = {"acme-support": 10, "acme-extra": 20, "globex-legal": 30}


def policy() -> AdapterSelection:
    s = settings([{"name": "acme", "adapters": {"large": "acme-support"},
                   "allowed_adapters": {"large": ["acme-extra"]}}, {"name": "globex"}])
    return make(AdapterSelection, s, {"big": FakeBackend("big", adapters=KNOWN),
                                    "small": FakeBackend("small")})


async def test_default_and_override() -> None:
    p = policy()
    c = ctx()
    assert (await p.apply(c)).action == "modify" and c.adapter == "acme-support"
    c = ctx(adapter="acme-extra")
    await p.apply(c)
    assert c.adapter == "acme-extra"
    c = ctx(tenant="globex")
    assert (await p.apply(c)).action == "pass" and c.adapter is None


async def test_other_tenants_adapter_is_403_unknown_is_404() -> None:
    p = policy()
    with pytest.raises(PermissionDenied) as denied:
        await p.apply(ctx(adapter="globex-legal"))
    assert denied.value.status == 403 and denied.value.code == "adapter_not_allowed"
    with pytest.raises(NotFound) as missing:
        await p.apply(ctx(adapter="nope"))
    assert missing.value.status == 404 and missing.value.code == "adapter_not_found"
    with pytest.raises(PermissionDenied):
        await p.apply(ctx(tenant="globex", adapter="acme-support"))
