"""The OpenAI wire format as the remote kinds read and write it: the body sent upstream, the
usage of an answer, one SSE stream's parsing state, an upstream's error answer, Retry-After.
backends/openai.py (the `openai` kind) and backends/litellm.py both use them."""

from __future__ import annotations

import datetime
import email.utils
from typing import Any

import orjson

from backends.upstream_http import UpstreamResponse
from gateway.core.context import LIMIT_FIELD, Chunk, RequestContext, Usage
from gateway.core.errors import BackendError

PASS_STATUS = (400, 404, 413, 422, 429)  # an upstream's answer the client gets as it is
# A Responses stream's last event, by how the response ended (the finish_reason recorded).
RESPONSES_END = {"response.completed": "stop", "response.incomplete": "length",
                 "response.failed": "error"}


class SSEState:
    """Parsing state of one upstream stream: usage and finish_reason seen so far, whether
    [DONE] came, and an error met after some chunks of the same block (raised after them)."""

    __slots__ = ("done", "error", "finish", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.done = False
        self.error: BackendError | None = None

    def feed(self, completed: list[bytes]) -> list[Chunk]:
        """The data of the events the EventReader completed, as chunks."""
        datas: list[bytes] = []
        done = False
        for data in completed:
            if data.strip() == b"[DONE]":
                done = True
                break
            if data.strip():
                datas.append(data)
        events: Any = None
        if datas:  # the block's events in one parse; anything odd takes the careful path
            try:
                events = orjson.loads(b"[" + b",".join(datas) + b"]")
            except orjson.JSONDecodeError:
                events = None
            if events is None or not all(type(e) is dict and "error" not in e for e in events):
                return self._feed_each(datas, done)
        out = [self._take(event) for event in events or ()]
        if done:
            out.append(self.end())
        return out

    def _feed_each(self, datas: list[bytes], done: bool) -> list[Chunk]:
        """Event by event: a malformed or error event raises after the chunks before it."""
        out: list[Chunk] = []
        for data in datas:
            try:
                event = parse_event(data)
            except BackendError as exc:
                if not out:
                    raise
                self.error = exc  # the chunks before it still go out first
                return out
            out.append(self._take(event))
        if done:
            out.append(self.end())
        return out

    def _take(self, event: dict[str, Any]) -> Chunk:
        usage = usage_of(event)
        if usage is not None:
            self.usage = usage
        for choice in event.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finish = str(choice["finish_reason"])
        end = RESPONSES_END.get(str(event.get("type")))
        if end is not None:
            self.finish = end
        return Chunk(event=event)

    def end(self) -> Chunk:
        """The stream is done; its last chunk carries the finish_reason and usage seen."""
        self.done = True
        return Chunk(finish_reason=self.finish or "stop", usage=self.usage)


def has_output(event: dict[str, Any]) -> bool:
    """An event that carries some of the answer (not only the role, or a Responses stream's
    created / in-progress notice, or usage)."""
    kind = event.get("type")
    if isinstance(kind, str):
        return kind not in ("response.created", "response.in_progress", "response.queued")
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        if choice.get("text") or choice.get("finish_reason") or any(
                v for k, v in delta.items() if k != "role"):
            return True
    return False


def upstream_body(ctx: RequestContext, model: str) -> dict[str, Any]:
    """The client's body for an upstream: its model's upstream name; the messages context_trim
    kept; the tenant's max_output_tokens where the request named no limit; usage asked of a
    stream when the client did not ask (the gateway needs it: the extra event is not shown)."""
    body = dict(ctx.body)
    body["model"] = model
    if ctx.kind == "chat" and ctx.messages is not None:
        body["messages"] = ctx.messages
    if ctx.output_cap is not None:
        body[LIMIT_FIELD[ctx.kind]] = ctx.output_cap
    if ctx.usage_injected:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
    return body


def usage_of(event: dict[str, Any]) -> Usage | None:
    """The usage an answer or event reports: chat/completions/embeddings' usage, or a
    Responses object's (at the top, or in a stream event's `response`)."""
    u = event.get("usage")
    inner = event.get("response")
    if u is None and isinstance(inner, dict):
        u = inner.get("usage")
    if not isinstance(u, dict):
        return None
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    try:
        return Usage(int(prompt or 0), int(completion or 0))
    except (TypeError, ValueError):
        return None


def parse_event(data: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except ValueError:
        raise BackendError("upstream sent malformed JSON", code="upstream_malformed") from None
    if not isinstance(event, dict):
        raise BackendError("upstream sent an unexpected JSON value", code="upstream_malformed")
    if isinstance(event.get("error"), dict):
        message = str(event["error"].get("message") or "upstream error")
        raise BackendError(f"upstream error: {message}", status=502, code="upstream_error")
    return event


def upstream_error(resp: UpstreamResponse) -> BackendError:
    """An upstream's error answer. A client's mistake or a rate limit passes through as the
    upstream said it (status, message, type, code, param, Retry-After); an upstream failure
    becomes 502."""
    status = resp.status_code
    fields: dict[str, Any] = {}
    try:
        err = resp.json().get("error", {})
        if isinstance(err, dict):
            fields = err
    except (ValueError, AttributeError):
        pass
    message = fields.get("message")
    message = str(message) if message else f"upstream answered {status}"
    if status not in PASS_STATUS:
        return BackendError(message, status=502, code="upstream_error")
    code = fields.get("code", "upstream_error")
    kind = fields.get("type")
    param = fields.get("param")
    return BackendError(message, status=status,
                        code=None if code is None else str(code),
                        type=kind if isinstance(kind, str) and kind else None,
                        param=param if isinstance(param, str) else None,
                        retry_after=retry_after_s(resp.retry_after))


def retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date; None if absent or odd."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(0.0, min(seconds, 86400.0)) if seconds == seconds else None
