"""Limits that hold across three gateway processes sharing one real Redis: counts
and invariants at a counting upstream, never durations, except where the spec is one
(a SIGKILLed gateway's capacity returns within lease_ttl_s)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.scale.conftest import ask, gateways, in_threads, metric, shared_config, wait_for
from tests.e2e.scale.counting_upstream import CountingUpstream
from tests.redis_server import RedisServer

ACME, GLOBEX, INITECH = "sk-demo-acme", "sk-demo-globex", "sk-initech"


@pytest.fixture(scope="module")
def three(upstream: CountingUpstream, redis: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with gateways(shared_config(upstream.url, redis.url), tmp_path_factory.mktemp("three")) as gws:
        yield [url for url, _ in gws]


def test_requests_per_minute_hold_across_three_gateways(three: list[str]) -> None:
    """60 a minute for acme, driven through all three at 15 a second for 10 s: at most
    60 + 1 a second of elapsed time (+1) answered in all; without the shared bucket each
    gateway would answer its own 60."""
    statuses: list[int] = []
    start = time.monotonic()
    for i in range(150):
        statuses.append(ask(three[i % 3], ACME))
        time.sleep(max(0.0, start + (i + 1) / 15 - time.monotonic()))
    elapsed = time.monotonic() - start
    answered = statuses.count(200)
    assert set(statuses) <= {200, 429}
    assert 60 <= answered <= 60 + elapsed + 1, (answered, elapsed)


def test_max_concurrency_holds_exactly_across_three_gateways(
        three: list[str], upstream: CountingUpstream) -> None:
    upstream.hold()
    upstream.reset_counts()
    threads, results = in_threads(12, lambda i: ask(three[i % 3], GLOBEX, stream=True))
    try:
        wait_for(lambda: upstream.in_flight == 4, "four globex requests in flight")
        time.sleep(0.5)  # the other eight stay queued (checked by the count below)
        assert upstream.in_flight == 4
    finally:
        upstream.release()
    for t in threads:
        t.join(120)
    assert results == [200] * 12
    assert upstream.max_in_flight == 4  # exactly the limit: reached, never passed
    assert upstream.received == 12


def test_kv_reservations_never_add_up_past_the_shared_budget(
        three: list[str], upstream: CountingUpstream) -> None:
    """Twelve requests of one size through three gateways; the budget holds five."""
    upstream.hold()
    upstream.reset_counts()
    threads, results = in_threads(12, lambda i: ask(three[i % 3], INITECH, stream=True))
    try:
        wait_for(lambda: upstream.in_flight == 5, "five requests in flight")
        time.sleep(0.5)
        assert upstream.in_flight == 5
    finally:
        upstream.release()
    for t in threads:
        t.join(120)
    assert results == [200] * 12 and upstream.max_in_flight == 5


def test_a_sigkilled_gateway_s_leases_return_within_lease_ttl(
        upstream: CountingUpstream, redis: RedisServer, tmp_path: Path) -> None:
    ttl = 2.0
    with gateways(shared_config(upstream.url, redis.url, key_prefix="kill:"), tmp_path) as gws:
        (a, _), (b, _), (c, c_proc) = gws
        upstream.hold()
        upstream.reset_counts()
        held, _ = in_threads(4, lambda i: ask(c, GLOBEX, stream=True))
        wait_for(lambda: upstream.in_flight == 4, "gateway C holding globex's four slots")
        c_proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        c_proc.wait(10)
        upstream.reset_counts()  # C's four stay open at the upstream until released
        waiting, results = in_threads(2, lambda i: ask([a, b][i], GLOBEX, stream=True))
        wait_for(lambda: upstream.received == 2, "the new requests admitted", timeout=ttl + 8)
        returned = time.monotonic() - killed
        upstream.release()
        for t in [*waiting, *held]:
            t.join(60)
        assert results == [200, 200]
        # the leases expire at most ttl after C's last renewal (every ttl/3), so they come
        # back within ttl of the kill; the margin covers the waiters' back-off (0.2 s)
        assert returned <= ttl + 1.0, returned


def _queued_at_most(upstream: CountingUpstream, urls: list[str], key: str, n: int,
                    limit: int) -> tuple[list[threading.Thread], list[int]]:
    upstream.hold()
    upstream.reset_counts()
    threads, results = in_threads(n, lambda i: ask(urls[i % len(urls)], key, stream=True))
    wait_for(lambda: upstream.in_flight >= min(limit, 3), "requests in flight")
    time.sleep(0.5)
    return threads, results


def test_redis_down_local_share_holds_and_recovers(upstream: CountingUpstream, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        with gateways(shared_config(upstream.url, server.url), tmp_path) as gws:
            urls = [u for u, _ in gws]
            wait_for(lambda: all(metric(u, "gateway_shared_state_processes") == 3 for u in urls),
                     "three live processes known to each")
            server.stop()
            # globex: max_concurrency 4 over 3 processes -> 1 each while Redis is down
            threads, results = _queued_at_most(upstream, urls, GLOBEX, 9, 3)
            assert upstream.in_flight == 3 and upstream.max_in_flight <= 4
            upstream.release()
            for t in threads:
                t.join(120)
            assert results == [200] * 9 and upstream.max_in_flight == 3
            assert all(metric(u, "gateway_shared_state_up") == 0 for u in urls)
            assert sum(metric(u, "gateway_shared_state_fallbacks_total") for u in urls) >= 9
            server.start()  # the same port, empty
            wait_for(lambda: all(ask(u, INITECH) == 200 and metric(u, "gateway_shared_state_up") == 1
                                 for u in urls), "every gateway using Redis again")
            threads, results = _queued_at_most(upstream, urls, GLOBEX, 9, 4)
            wait_for(lambda: upstream.in_flight == 4, "four in flight again, through Redis")
            upstream.release()
            for t in threads:
                t.join(120)
            assert results == [200] * 9 and upstream.max_in_flight == 4
    finally:
        upstream.release()
        server.stop()


def test_redis_down_reject_answers_503_then_recovers(upstream: CountingUpstream, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        cfg = shared_config(upstream.url, server.url, on_unavailable="reject")
        with gateways(cfg, tmp_path, n=1) as gws:
            url = gws[0][0]
            assert ask(url, GLOBEX) == 200
            server.stop()
            assert ask(url, GLOBEX) == 503
            assert metric(url, "gateway_shared_state_fallbacks_total") >= 1
            server.start()
            wait_for(lambda: ask(url, GLOBEX) == 200, "answers once Redis is back")
    finally:
        server.stop()
