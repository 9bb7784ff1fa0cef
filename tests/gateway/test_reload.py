"""Hot reload in-process (gateway/reload.py): an app built from a config file, driven over
ASGI, against a small upstream in the same event loop that holds its answers until told.

Every wait here is on an event or a bounded poll of a state change, never a sleep for time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.settings import ConfigError, load_settings
from tests.gateway.upstream import Upstream

ADMIN = "sk-admin-reload"
def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config(upstream: str, keys_file: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"admin_api_key_env": "RELOAD_ADMIN_KEY"},
        "backends": {"up": {"kind": "openai", "url": upstream}},
        "models": [{"name": "m", "backend": "up"}],
        "tenants": [{"name": "acme", "api_keys_file": keys_file.name, "models": ["m"]}],
        "policies": ["adapter_selection", "routing", "admission"],
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def write(path: Path, cfg: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    os.replace(tmp, path)  # whole, as an editor or a ConfigMap update writes it


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(load_settings(path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     timeout=30) as client:
            yield app, client


@dataclass
class Gateway:
    app: Any
    client: httpx.AsyncClient
    cfg: dict[str, Any]  # the config as written: edit it, then `write()` and reload
    path: Path
    keys: Path  # acme's keys file
    up: Upstream

    def write(self) -> None:
        write(self.path, self.cfg)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, key: str = "sk-acme",
                  edit: Callable[[dict[str, Any]], object] | None = None,
                  ) -> AsyncIterator[Gateway]:
    """An app serving tmp_path/gateway.yaml: tenant acme (keys file acme.keys holding `key`)
    on model m of backend `up`, a test upstream."""
    async with Upstream() as up:
        keys = tmp_path / "acme.keys"
        keys.write_text(f"# acme's keys\n{key}\n")
        path = tmp_path / "gateway.yaml"
        cfg = config(up.url, keys)
        if edit is not None:
            edit(cfg)
        write(path, cfg)
        async with serving(path) as (app, client):
            yield Gateway(app, client, cfg, path, keys, up)


async def chat(client: httpx.AsyncClient, key: str) -> int:
    r = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return r.status_code


async def reload(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})


async def debug_config(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/debug/config", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture(autouse=True)
def _admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOAD_ADMIN_KEY", ADMIN)


def test_reload_swaps_keys_tenants_and_limits_and_keeps_the_backend(tmp_path: Path) -> None:
    def limit(cfg: dict[str, Any]) -> None:
        cfg["tenants"][0]["limits"] = {"requests_per_minute": 600}

    async def go() -> None:
        async with gateway(tmp_path, "sk-acme-old", limit) as gw:
            client = gw.client
            backend = gw.app.state.gateway.backends["up"]
            before = await debug_config(client)
            assert await chat(client, "sk-acme-old") == 200
            assert await chat(client, "sk-initech") == 401
            # rotate acme's key, add a tenant (its key as a digest), change a limit
            gw.keys.write_text("sk-acme-new\n")
            (tmp_path / "initech.keys").write_text(digest("sk-initech") + "\n")
            gw.cfg["tenants"][0]["limits"] = {"requests_per_minute": 2}
            gw.cfg["tenants"].append({"name": "initech", "api_keys_file": "initech.keys",
                                      "models": ["m"]})
            gw.write()
            r = await reload(client)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["result"] == "ok" and body["previous_version"] == before["version"]
            after = await debug_config(client)
            assert after["version"] == body["version"] != before["version"]
            assert after["tenants"] == ["acme", "initech"]
            assert after["last_reload"]["result"] == "ok"
            assert await chat(client, "sk-acme-old") == 401
            assert await chat(client, "sk-initech") == 200
            # the new limit: 2 a minute, and this minute's first request (before the reload,
            # under 600 a minute) still counts
            assert [await chat(client, "sk-acme-new") for _ in range(2)] == [200, 429]
            assert gw.app.state.gateway.backends["up"] is backend  # no restart of a backend
            assert (await reload(client)).json()["result"] == "unchanged"
            scraped = (await client.get("/metrics")).text
            assert 'gateway_config_reloads_total{result="ok"} 1.0' in scraped
            assert 'gateway_config_reloads_total{result="unchanged"} 1.0' in scraped
            assert f'gateway_config_info{{version="{after["version"]}"}} 1.0' in scraped
            for secret in ("sk-acme-old", "sk-acme-new", "sk-initech", ADMIN):
                assert secret not in json.dumps(after) + json.dumps(body) + scraped

    asyncio.run(go())


@pytest.mark.parametrize(("edit", "field"), [
    (lambda cfg: cfg["tenants"][0].update(modles=["m"]), "tenants[0].modles: unknown field"),
    (lambda cfg: cfg["models"][0].update(backend="nope"), "models[0].backend: no backend named"),
    (lambda cfg: cfg["tenants"][0].update(api_keys_file="missing.keys"),
     "tenants[0].api_keys_file: cannot read keys file"),
])
def test_an_invalid_config_is_refused_with_the_start_error_and_the_old_one_serves(
        tmp_path: Path, edit: Any, field: str) -> None:
    async def go() -> None:
        async with gateway(tmp_path) as gw:
            client = gw.client
            before = await debug_config(client)
            edit(gw.cfg)
            gw.write()
            with pytest.raises(ConfigError) as at_start:  # what start-up would say
                load_settings(gw.path)
            r = await reload(client)
            assert r.status_code == 400
            body = r.json()
            assert body["result"] == "invalid" and field in body["error"]["message"]
            assert body["error"]["message"] == str(at_start.value)
            assert body["error"]["code"] == "config_invalid"
            assert (await debug_config(client))["version"] == before["version"]
            assert await chat(client, "sk-acme") == 200  # the old config serves on
            scraped = (await client.get("/metrics")).text
            assert "gateway_config_last_reload_successful 0.0" in scraped
            assert 'gateway_config_reloads_total{result="invalid"} 1.0' in scraped

    asyncio.run(go())


def test_a_keys_file_error_never_quotes_a_key(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway(tmp_path) as gw:
            gw.keys.write_text("sk-acme\nsk-live-secret with a space\n")
            body = (await reload(gw.client)).json()
            assert body["result"] == "invalid"
            assert "acme.keys line 2" in body["error"]["message"]
            assert "sk-live-secret" not in json.dumps(body)
            gw.keys.write_text("# every key revoked\n")
            body = (await reload(gw.client)).json()
            assert body["result"] == "invalid" and "holds no key" in body["error"]["message"]
            assert await chat(gw.client, "sk-acme") == 200

    asyncio.run(go())


def test_in_flight_request_finishes_and_the_replaced_backend_closes_after_it(
        tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway(tmp_path) as gw, Upstream() as new_up:
            client, old_up = gw.client, gw.up
            old = gw.app.state.gateway.backends["up"]
            old_up.gate.clear()
            in_flight = asyncio.ensure_future(chat(client, "sk-acme"))
            await asyncio.wait_for(old_up.arrived.wait(), 10)
            gw.cfg["backends"]["up"]["url"] = new_up.url  # a changed backend definition
            gw.write()
            body = (await reload(client)).json()
            assert body["result"] == "ok" and body["backends"] == {"up": "replaced"}
            new = gw.app.state.gateway.backends["up"]
            assert new is not old and await new.health()
            assert await old.health()  # still open: a request of the old config holds it
            assert await chat(client, "sk-acme") == 200  # new requests: the new backend
            assert (old_up.requests, new_up.requests) == (1, 1)
            old_up.gate.set()
            assert await asyncio.wait_for(in_flight, 10) == 200  # finished, not cut
            for _ in range(200):  # closed once nothing of the old config is left
                if not await old.health():
                    break
                await asyncio.sleep(0.05)
            assert not await old.health()

    asyncio.run(go())


def test_a_backend_that_cannot_start_refuses_the_reload(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway(tmp_path) as gw:
            before = gw.app.state.gateway
            gw.cfg["backends"]["local"] = {"kind": "local", "model": str(tmp_path / "nothing")}
            gw.cfg["models"].append({"name": "small", "backend": "local"})
            gw.write()
            r = await reload(gw.client)
            assert r.status_code == 503
            body = r.json()
            assert body["result"] == "failed"
            assert body["error"]["message"].startswith("backends.local: cannot start")
            assert gw.app.state.gateway is before  # nothing swapped
            assert await chat(gw.client, "sk-acme") == 200

    asyncio.run(go())


def test_watch_mode_follows_a_kubernetes_secret_update(tmp_path: Path) -> None:
    """A Secret volume: `acme.keys -> ..data/acme.keys`, `..data -> ..v1`; an update writes
    `..v2` and swaps the `..data` link in one rename."""
    mount = tmp_path / "secret"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "acme.keys").write_text("sk-acme-v1\n")
    (mount / "..data").symlink_to("..v1")
    (mount / "acme.keys").symlink_to("..data/acme.keys")

    def watch(cfg: dict[str, Any]) -> None:
        cfg["tenants"][0]["api_keys_file"] = "secret/acme.keys"
        cfg["server"]["reload"] = "watch"

    async def go() -> None:
        async with gateway(tmp_path, edit=watch) as gw:
            client = gw.client
            before = (await debug_config(client))["version"]
            assert await chat(client, "sk-acme-v1") == 200
            (mount / "..v2").mkdir()
            (mount / "..v2" / "acme.keys").write_text("sk-acme-v2\n")
            (mount / "..data_tmp").symlink_to("..v2")
            os.replace(mount / "..data_tmp", mount / "..data")
            for _ in range(300):  # the watch polls once a second: wait for the new version
                now = await debug_config(client)
                if now["version"] != before:
                    break
                await asyncio.sleep(0.05)
            assert now["version"] != before and now["last_reload"]["trigger"] == "watch"
            assert await chat(client, "sk-acme-v2") == 200
            assert await chat(client, "sk-acme-v1") == 401

    asyncio.run(go())


def test_admin_routes_need_the_admin_key(tmp_path: Path) -> None:
    async def go() -> None:
        async with gateway(tmp_path) as gw:
            for key in (None, "sk-acme", "sk-wrong"):
                headers = {"authorization": f"Bearer {key}"} if key else {}
                assert (await gw.client.post("/admin/reload", headers=headers)).status_code == 401
                assert (await gw.client.get("/debug/config", headers=headers)).status_code == 401

    asyncio.run(go())
