"""The shared state's Redis client against a real redis-server: scripts (EVAL once, then
EVALSHA; again after a restart forgot them), pipelined callers, a password, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from policies.redis_client import RedisClient, RedisError, encode
from tests.redis_server import RedisServer

LUA = "return {tonumber(ARGV[1]) * 2, KEYS[1]}"


def test_commands_are_resp_arrays() -> None:
    assert encode("GET", b"k", 7) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$1\r\n7\r\n"


async def test_scripts_pipelined_callers_and_a_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = RedisClient(server.url)
    try:
        replies = await asyncio.gather(*(client.script(LUA, [f"k{i}"], [i]) for i in range(50)))
        assert replies == [[2 * i, f"k{i}".encode()] for i in range(50)]  # each its own answer
        assert await client.call("SCRIPT", "EXISTS", "0" * 40) == [0]
        with pytest.raises(RedisError):
            await client.script("return redis.call('NOPE')", [], [])
        server.stop()
        with pytest.raises(OSError):
            await client.script(LUA, ["k"], [1])
        server.start()  # empty: the script must be sent again (NOSCRIPT -> EVAL)
        assert await client.script(LUA, ["k"], [4]) == [8, b"k"]
    finally:
        await client.aclose()
        server.stop()


async def test_a_password_in_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, args=("--requirepass", "s3cret"))
    server.start()
    try:
        wrong = RedisClient(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(RedisError):
            await wrong.call("PING")
        await wrong.aclose()
        right = RedisClient(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        assert await right.call("PING") == b"PONG"
        await right.aclose()
    finally:
        server.stop()
