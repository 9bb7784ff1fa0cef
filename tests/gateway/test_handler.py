"""gateway/handler.py in process: GenerationHandler.handle(Incoming, ResponseWriter) with a
recording writer and a scripted backend (tests/gateway/fakes.py), over the app create_app
builds (the default policy chain, admission's reservations, telemetry and the usage log).
Each answer's status, OpenAI-shaped error, headers or events, the one usage record per
request, and what admission still holds afterwards. The field-by-field 400s through the
handler are in tests/gateway/test_validation.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.core.errors import BackendError
from gateway.http.contract import Incoming, Media
from tests.gateway.fakes import (
    ACME_KEY,
    Hold,
    RecordingWriter,
    ScriptedBackend,
    last_chunk,
    running,
    text_chunks,
)
from tests.server import metric

HI = [{"role": "user", "content": "hi"}]
CHAT = {"model": "demo", "messages": HI}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def no_secret(out: RecordingWriter, *secrets: str) -> None:
    text = (out.body or b"").decode() + repr(out.headers) + b"".join(out.events).decode()
    for secret in secrets:
        assert secret not in text


# ---- answers ------------------------------------------------------------------------------


def test_a_whole_answer(tmp_path: Path) -> None:
    backend = ScriptedBackend()

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(
                {**CHAT, "max_tokens": 8}, headers=[(b"x-request-id", b"req-abc-1")]
            )
            assert (out.status, out.media) == (200, Media.JSON)
            body = out.json()
            assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-req-abc-1"
            assert body["choices"] == [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ]
            assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            assert out.headers["x-request-id"] == "req-abc-1"
            assert out.headers["x-gateway-backend"] == "local"
            assert out.headers["x-gateway-adapter"] == "acme-support"
            assert int(out.headers["x-gateway-kv-bytes"]) > 0  # admission reserved for it
            assert gw.reserved == 0  # ... and released it after the answer
            assert (backend.opened, backend.closed) == (1, 1)
            [record] = gw.usage_records()
            assert (record["status"], record["tenant"], record["stream"]) == (200, "acme", False)
            assert record["request_id"] == "req-abc-1"
            assert (record["prompt_tokens"], record["completion_tokens"]) == (3, 2)
            assert gw.state.active == 0 and gw.state.telemetry.in_flight() == []

    run(go())


def test_a_stream_with_usage_ends_with_done(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
            assert (out.status, out.media, out.complete) == (200, Media.SSE, True)
            data = out.data()
            assert data[-1] == b"[DONE]"
            events = [orjson.loads(d) for d in data[:-1]]
            assert len({e["id"] for e in events}) == 1
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            text = "".join(
                e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
            )
            assert text == "Hello there"
            finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
            assert [f for f in finishes if f] == ["stop"]
            assert events[-1]["choices"] == [] and events[-1]["usage"] == {
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "total_tokens": 5,
            }
            assert all(e["usage"] is None for e in events[:-1])
            assert out.headers["x-gateway-adapter"] == "acme-support"
            assert gw.reserved == 0
            [record] = gw.usage_records()
            assert (record["status"], record["stream"], record["completion_tokens"]) == (
                200,
                True,
                2,
            )

    run(go())


def test_a_stream_without_include_usage_has_no_usage_field(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call({**CHAT, "stream": True})
            data = out.data()
            assert data[-1] == b"[DONE]"
            assert all("usage" not in orjson.loads(d) for d in data[:-1])

    run(go())


def test_a_completion_and_its_stream(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            body = {"model": "demo", "prompt": "Our refund policy is"}
            whole = await gw.call(body, path="/v1/completions")
            assert whole.status == 200
            assert whole.json()["object"] == "text_completion"
            assert whole.json()["choices"][0]["text"] == "Hello there"
            streamed = await gw.call({**body, "stream": True}, path="/v1/completions")
            events = [orjson.loads(d) for d in streamed.data()[:-1]]
            assert "".join(e["choices"][0]["text"] for e in events) == "Hello there"
            assert {e["object"] for e in events} == {"text_completion"}
            assert len(gw.usage_records()) == 2

    run(go())


# ---- errors before anything is read -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, "missing_api_key"),
        ("sk-not-a-key-1234", "invalid_api_key"),
    ],
)
def test_auth_errors_are_401_and_never_echo_the_key(
    tmp_path: Path, key: str | None, code: str
) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call({**CHAT, "user": "sk-not-a-key-1234"}, key=key)
            assert out.status == 401
            err = out.error()
            assert (err["code"], err["type"]) == (code, "invalid_request_error")
            assert out.headers["x-request-id"]
            no_secret(out, "sk-not-a-key-1234")
            assert out.reads == 0  # refused before the body is read
            [record] = gw.usage_records()
            assert (record["status"], record["tenant"], record["model"]) == (401, None, None)
            assert "sk-not-a-key" not in orjson.dumps(record).decode()

    run(go())


def test_a_malformed_authorization_header_is_401(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(
                CHAT, key=None, headers=[(b"authorization", b"Basic " + ACME_KEY.encode())]
            )
            assert out.status == 401 and out.error()["code"] == "invalid_api_key"
            no_secret(out, ACME_KEY)

    run(go())


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
def test_a_wrong_content_type_is_415(tmp_path: Path, ctype: str) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(CHAT, ctype=ctype)
            assert out.status == 415
            assert out.error()["code"] == "unsupported_media_type"
            assert out.reads == 0

    run(go())


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", None])
def test_json_with_a_charset_or_no_content_type_is_served(
    tmp_path: Path, ctype: str | None
) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            assert (await gw.call(CHAT, ctype=ctype)).status == 200

    run(go())


def test_a_declared_length_over_the_limit_is_413_unread(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(CHAT, headers=[(b"content-length", b"70000")])
            assert out.status == 413 and out.error()["code"] == "request_too_large"
            assert out.reads == 0

    run(go())


def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    """No content-length: the body arrives in parts and passes the 64 KiB limit."""

    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(
                raw=[b'{"model":"demo","messages":[', b" " * 40000, b" " * 40000, b"]}"]
            )
            assert out.status == 413 and out.error()["code"] == "request_too_large"
            [record] = gw.usage_records()
            assert record["status"] == 413

    run(go())


def test_a_body_that_never_finishes_is_408(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, body_timeout_s=0.05) as gw:
            out = await gw.call(writer=RecordingWriter(b'{"model"', stall=True))
            assert out.status == 408 and out.error()["code"] == "request_timeout"

    run(go())


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b"", 400),
        (b'{"model": "\xff\xfe"}', 400),
        (b"[" * 100000 + b"]" * 100000, 413),
        (b"[" * 5000 + b"]" * 5000, 400),
    ],
)
def test_malformed_bodies(tmp_path: Path, raw: bytes, status: int) -> None:
    """(Moved from tests/e2e/test_api.py: the body's bytes, parsed by the handler.)"""

    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(raw=raw)
            assert out.status == status
            err = out.error()
            assert err["message"]
            if status == 400:
                assert err["code"] in ("invalid_json", "nesting_too_deep")

    run(go())


def test_a_get_is_405_with_allow(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            out = await gw.call(CHAT, method="GET")
            assert out.status == 405 and out.error()["code"] == "method_not_allowed"
            assert out.headers["allow"] == "POST" and out.reads == 0

    run(go())


@pytest.mark.parametrize("model", ["other", "demo:globex-legal", "demo:nope"])
def test_an_unknown_model_is_404(tmp_path: Path, model: str) -> None:
    """Another tenant's adapter answers as a model that does not exist."""
    backend = ScriptedBackend()

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call({**CHAT, "model": model})
            assert out.status == 404
            err = out.error()
            assert (err["code"], err["param"]) == ("model_not_found", "model")
            assert backend.opened == 0
            [record] = gw.usage_records()
            assert record["status"] == 404 and record["tenant"] is None

    run(go())


def test_an_output_limit_above_the_tenant_cap_is_400_and_none_gets_the_cap(tmp_path: Path) -> None:
    backend = ScriptedBackend()

    async def go() -> None:
        from gateway.settings import parse_settings
        from tests.gateway.fakes import config

        cfg = config(tmp_path)
        cfg["tenants"][0]["limits"] = {"max_output_tokens": 16}
        async with running(tmp_path, backend, settings=parse_settings(cfg)) as gw:
            out = await gw.call({**CHAT, "max_tokens": 17})
            err = out.error()
            assert (out.status, err["code"], err["param"]) == (
                400,
                "max_output_tokens_exceeded",
                "max_tokens",
            )
            out = await gw.call(CHAT)
            assert out.status == 200 and out.headers["x-gateway-max-output-tokens"] == "16"
            assert backend.contexts[-1].sampling.max_tokens == 16

    run(go())


def test_a_request_before_the_gateway_is_ready_is_503(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            gw.state.ready = False
            out = await gw.call(CHAT)
            assert out.status == 503 and out.error()["code"] == "service_unavailable"
            assert out.headers["retry-after"] == "1"

    run(go())


@pytest.mark.parametrize(
    ("value", "status", "code"),
    [
        (b"low", 200, None),
        (b"normal", 200, None),
        (b"high", 400, "priority_not_allowed"),
        (b"urgent", 400, "invalid_priority"),
    ],
)
def test_a_request_may_only_lower_its_priority(
    tmp_path: Path, value: bytes, status: int, code: str | None
) -> None:
    backend = ScriptedBackend()

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(CHAT, headers=[(b"x-gateway-priority", value)])
            assert out.status == status
            if code is not None:
                assert out.error()["code"] == code and backend.opened == 0
            else:
                assert backend.contexts[-1].priority == value.decode()

    run(go())


def test_cors_headers_for_a_configured_origin_only(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, cors_origins=["https://app.example"]) as gw:
            ok = await gw.call(CHAT, headers=[(b"origin", b"https://app.example")])
            assert ok.headers["access-control-allow-origin"] == "https://app.example"
            assert "x-request-id" in ok.headers["access-control-expose-headers"]
            err = await gw.call(CHAT, key=None, headers=[(b"origin", b"https://app.example")])
            assert err.status == 401  # an error a browser's script can read too
            assert err.headers["access-control-allow-origin"] == "https://app.example"
            other = await gw.call(CHAT, headers=[(b"origin", b"https://evil.example")])
            assert "access-control-allow-origin" not in other.headers

    run(go())


def test_a_responses_request_is_served_over_chat(tmp_path: Path) -> None:
    """A backend that does not forward Responses serves it as a chat (gateway/responses_api.py)."""
    backend = ScriptedBackend()

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call({"model": "demo", "input": "hi"}, path="/v1/responses")
            assert out.status == 200
            body = out.json()
            assert body["object"] == "response" and body["status"] == "completed"
            texts = [part["text"] for item in body["output"] for part in item["content"]]
            assert texts == ["Hello there"]
            assert backend.contexts[-1].kind == "chat" and backend.contexts[-1].via_chat
            streamed = await gw.call(
                {"model": "demo", "input": "hi", "stream": True}, path="/v1/responses"
            )
            frames = b"".join(streamed.events)
            assert b"event: response.completed" in frames and b"[DONE]" not in frames

    run(go())


# ---- the backend fails --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_error_before_the_first_byte_is_its_status(tmp_path: Path, stream: bool) -> None:
    backend = ScriptedBackend(
        script=[BackendError("upstream is down", 503, "upstream_unavailable", retry_after=2)]
    )

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call({**CHAT, "stream": stream})
            assert (out.status, out.media) == (503, Media.JSON)  # not a 200 stream
            err = out.error()
            assert (err["code"], err["type"]) == ("upstream_unavailable", "api_error")
            assert out.headers["retry-after"] == "2"
            assert out.events == []
            assert gw.reserved == 0 and backend.closed == 1
            [record] = gw.usage_records()
            assert record["status"] == 503
            scraped = gw.state.telemetry.scrape().decode()
            assert (
                metric(
                    scraped,
                    "gateway_backend_errors_total",
                    backend="local",
                    code="upstream_unavailable",
                    phase="before_first_byte",
                )
                == 1
            )

    run(go())


def test_a_backend_error_mid_stream_ends_it_without_done(tmp_path: Path) -> None:
    backend = ScriptedBackend(
        script=[*text_chunks("Hel"), BackendError("upstream reset", 502, "upstream_reset")]
    )

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call({**CHAT, "stream": True})
            assert (out.status, out.complete, out.cut) == (200, True, False)
            data = out.data()
            assert b"[DONE]" not in data  # no client takes it for a whole answer
            error = orjson.loads(data[-1])
            assert set(error) == {"error"} and error["error"]["code"] == "upstream_reset"
            texts = [orjson.loads(d)["choices"][0]["delta"].get("content") for d in data[:-1]]
            assert texts == ["", "Hel"]
            assert gw.reserved == 0 and backend.closed == 1
            assert len(gw.usage_records()) == 1
            scraped = gw.state.telemetry.scrape().decode()
            assert (
                metric(
                    scraped,
                    "gateway_backend_errors_total",
                    code="upstream_reset",
                    phase="mid_stream",
                )
                == 1
            )

    run(go())


def test_a_backend_error_after_the_first_chunk_of_a_whole_answer_is_its_status(
    tmp_path: Path,
) -> None:
    backend = ScriptedBackend(
        script=[*text_chunks("Hel"), BackendError("upstream reset", 502, "upstream_reset")]
    )

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(CHAT)
            assert out.status == 502 and out.error()["code"] == "upstream_reset"
            assert gw.reserved == 0 and backend.closed == 1

    run(go())


def test_an_unexpected_failure_is_a_500_without_details(tmp_path: Path) -> None:
    backend = ScriptedBackend(script=[RuntimeError("secret internal state sk-xyz")])

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = await gw.call(CHAT)
            assert out.status == 500
            err = out.error()
            assert err["type"] == "api_error" and "secret" not in err["message"]
            assert "Traceback" not in (out.body or b"").decode()
            assert gw.reserved == 0
            [record] = gw.usage_records()
            assert record["status"] == 500

    run(go())


# ---- the client goes away -----------------------------------------------------------------


def test_a_client_gone_mid_stream_releases_the_reservation(tmp_path: Path) -> None:
    hold = Hold(after=2)  # two chunks out, then the backend waits
    backend = ScriptedBackend(script=[*text_chunks("a", "b", "c"), last_chunk(3)], hold=hold)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = RecordingWriter(orjson.dumps({**CHAT, "stream": True}))
            task = asyncio.create_task(
                gw.handler.handle(
                    Incoming(
                        "chat",
                        "POST",
                        "/v1/chat/completions",
                        [(b"authorization", f"Bearer {ACME_KEY}".encode())],
                    ),
                    out,
                )
            )
            await hold.reached.wait()
            snapshot = gw.state.policies.reservations.snapshot()
            assert snapshot["by_tenant"] == {"acme": gw.reserved} and gw.reserved > 0
            assert len(gw.state.telemetry.in_flight()) == 1 and gw.state.active == 1
            out.leave()
            await task  # the client's cancellation ends in the handler
            assert out.gone and not task.cancelled()
            sent = [orjson.loads(d)["choices"][0]["delta"].get("content") for d in out.data()]
            assert sent == ["", "a", "b"]  # what went out before the client left; no [DONE]
            assert gw.state.policies.reservations.snapshot()["by_tenant"] == {}
            assert gw.reserved == 0 and backend.closed == 1
            assert gw.state.active == 0 and gw.state.telemetry.in_flight() == []
            [record] = gw.usage_records()
            assert record["stream"] is True
            # and the next request is served as if nothing happened
            hold.release.set()
            assert (await gw.call(CHAT)).status == 200
            assert gw.reserved == 0

    run(go())


def test_a_client_gone_before_a_whole_answer_is_499_and_releases(tmp_path: Path) -> None:
    hold = Hold(after=1)
    backend = ScriptedBackend(hold=hold)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = RecordingWriter(orjson.dumps(CHAT), leave_after=0)  # gone once the body is in
            task = asyncio.create_task(
                gw.handler.handle(
                    Incoming(
                        "chat",
                        "POST",
                        "/v1/chat/completions",
                        [(b"authorization", f"Bearer {ACME_KEY}".encode())],
                    ),
                    out,
                )
            )
            await task
            assert out.gone and out.status is None and out.body is None  # nobody to answer
            assert gw.reserved == 0
            assert backend.opened == backend.closed
            [record] = gw.usage_records()
            assert record["status"] == 499

    run(go())


def test_a_server_shutdown_cancel_is_not_swallowed(tmp_path: Path) -> None:
    """A cancellation that is not the client's (the writer did not mark it gone) goes on."""
    hold = Hold(after=1)
    backend = ScriptedBackend(hold=hold)

    async def go() -> None:
        async with running(tmp_path, backend) as gw:
            out = RecordingWriter(orjson.dumps({**CHAT, "stream": True}))
            task = asyncio.create_task(
                gw.handler.handle(
                    Incoming(
                        "chat",
                        "POST",
                        "/v1/chat/completions",
                        [(b"authorization", f"Bearer {ACME_KEY}".encode())],
                    ),
                    out,
                )
            )
            await hold.reached.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gw.reserved == 0 and backend.closed == 1
            assert len(gw.usage_records()) == 1

    run(go())


# ---- the usage record: one per request, whatever its end ----------------------------------


def test_one_usage_record_per_request(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path) as gw:
            statuses = [
                (await gw.call(CHAT)).status,
                (await gw.call({**CHAT, "stream": True})).status,
                (await gw.call(CHAT, key="sk-wrong-0000")).status,
                (await gw.call({**CHAT, "model": "nope"})).status,
                (await gw.call({**CHAT, "stream": "yes"})).status,
                (await gw.call(raw=b"{")).status,
                (await gw.call(CHAT, method="GET")).status,
            ]
            assert statuses == [200, 200, 401, 404, 400, 400, 405]
            records = gw.usage_records()
            assert [r["status"] for r in records] == statuses
            assert len({r["request_id"] for r in records}) == len(records)
            scraped = gw.state.telemetry.scrape().decode()
            assert metric(scraped, "gateway_requests_total") == len(statuses)
            for status in set(statuses):
                assert metric(
                    scraped, "gateway_requests_total", status=str(status)
                ) == statuses.count(status)

    run(go())
