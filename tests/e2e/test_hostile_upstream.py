"""An upstream that misbehaves, through a real `gateway serve` and the official SDK: every
request gets its own answer or a clean OpenAI error, never another
request's bytes, and is never sent to the upstream twice."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import openai
import pytest

from tests.e2e.conftest import NOTHING_HELD, ask, back_in_rotation, held, sdk
from tests.e2e.hostile_upstream import HostileUpstream, answer_text


def marker() -> str:
    return uuid.uuid4().hex[:12]


@pytest.mark.parametrize("stream", [False, True])
def test_interim_103_is_skipped_and_the_next_request_gets_its_own_answer(
        hostile_gateway: str, hostile: HostileUpstream, stream: bool) -> None:
    """Defect 1: an interim response used to answer the request (502) and leave the real
    answer on the pooled connection for the next request: another tenant's."""
    first, second = marker(), marker()
    assert ask(hostile_gateway, "early-hints", first, stream=stream) == answer_text(first)
    assert ask(hostile_gateway, "plain", second, stream=stream, key="sk-demo-globex") == answer_text(second)
    assert hostile.count("early-hints", first) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["extra-bytes", "extra-nodone"])
def test_bytes_after_the_end_of_an_answer_reach_nobody(
        hostile_gateway: str, hostile: HostileUpstream, stream: bool, mode: str) -> None:
    """Defect 2: a second response in the same segment was spliced into the streamed answer
    ("Hello" + "INJECTED") or left for the next request."""
    first, second = marker(), marker()
    assert ask(hostile_gateway, mode, first, stream=stream) == answer_text(first)
    for _ in range(6):  # enough requests to reuse every pooled connection
        mark = marker()
        assert ask(hostile_gateway, "plain", mark, stream=stream, key="sk-demo-globex") == answer_text(mark)
    assert ask(hostile_gateway, "plain", second) == answer_text(second)


def test_a_10_mb_json_answer_arrives(hostile_gateway: str, hostile: HostileUpstream) -> None:
    """Defect 3: non-streamed answers past 512 KB paused reading for good (read timeout)."""
    mark = marker()
    text = ask(hostile_gateway, "big-json", mark)
    assert text.startswith(answer_text(mark) + " ") and len(text) > 10 * 2**20
    assert hostile.count("big-json", mark) == 1


@pytest.mark.parametrize("mode", ["close", "reset"])
def test_a_request_the_upstream_received_is_never_sent_again(
        hostile_gateway: str, hostile: HostileUpstream, mode: str) -> None:
    """Defect 4: an upstream that read the request and then closed or reset the connection was
    sent the same generation again (2-4 times). Once written, a request is not retried."""
    for stream in (False, True):
        mark = marker()
        with pytest.raises(openai.APIStatusError) as info:
            ask(hostile_gateway, mode, mark, stream=stream)
        assert info.value.status_code == 502
        assert hostile.count(mode, mark) == 1
        back_in_rotation(hostile_gateway)


def test_a_gzip_answer_is_decoded(hostile_gateway: str, hostile: HostileUpstream) -> None:
    for stream in (False, True):
        mark = marker()
        assert ask(hostile_gateway, "gzip", mark, stream=stream) == answer_text(mark)


def test_a_leading_bom_keeps_the_first_event(hostile_gateway: str) -> None:
    mark = marker()
    assert ask(hostile_gateway, "bom", mark, stream=True) == answer_text(mark)


def test_multi_line_data_and_cr_line_endings(hostile_gateway: str) -> None:
    mark = marker()
    assert ask(hostile_gateway, "multiline", mark, stream=True) == answer_text(mark)


def test_an_upstream_429_passes_through_with_retry_after(hostile_gateway: str, hostile: HostileUpstream) -> None:
    mark = marker()
    with pytest.raises(openai.RateLimitError) as info:
        ask(hostile_gateway, "rate-limited", mark)
    resp = info.value.response
    assert resp.headers["retry-after"] == "17"
    assert resp.json()["error"] == {"message": "Rate limit reached for requests",
                                    "type": "requests", "param": None,
                                    "code": "rate_limit_exceeded"}
    assert hostile.count("rate-limited", mark) == 1  # no retry, no failover
    after = marker()
    assert ask(hostile_gateway, "plain", after) == answer_text(after)  # still in rotation


def test_a_20_mb_response_head_is_refused_without_stalling(
        hostile_gateway: str, hostile: HostileUpstream) -> None:
    """A response head is bounded (64 KiB): past it the answer is 502 and the connection
    closes before the upstream could write it all; the hostile_gateway answers /health meanwhile."""
    health: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                health.append(client.get(hostile_gateway.removesuffix("/v1") + "/health").status_code)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    while not health:  # the poller is under way before the upstream's head starts
        time.sleep(0.01)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            ask(hostile_gateway, "huge-head", marker())
    finally:
        stop.set()
        poller.join()
    assert info.value.status_code == 502
    for _ in range(600):  # the upstream learns of the close at its next write
        if hostile.huge_head_sent:
            break
        time.sleep(0.05)
    assert hostile.huge_head_sent == [False]  # not read to its end
    assert health and set(health) == {200}
    back_in_rotation(hostile_gateway)


def test_a_body_past_max_response_bytes_is_a_502(hostile_gateway: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        ask(hostile_gateway, "huge-body", marker())
    assert info.value.status_code == 502
    assert "larger than" in info.value.response.json()["error"]["message"]
    back_in_rotation(hostile_gateway)


def test_nothing_is_held_afterwards(hostile_gateway: str) -> None:
    assert held(hostile_gateway) == NOTHING_HELD
    mark = marker()
    assert sdk(hostile_gateway).chat.completions.create(
        model="up", messages=[{"role": "user", "content": f"plain {mark}"}]
    ).choices[0].message.content == answer_text(mark)
