"""Input review, items 5-9, 13, 14, 17 and 18, against a real `gateway serve` on the demo
(usage records in a file, JSON logs): whatever bytes a request body carries, the answer is an
OpenAI-shaped error naming the param or the answer itself, never a 500; every request writes
its usage record, which never holds a key; another tenant's adapter answers as a name that
exists nowhere. Each test failed within seconds on the code before the fix (a 500, a 200, a
403, a missing record or a key in clear)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import demo_config, running_gateway

ADMIN_KEY = "sk-admin-input-review"
ACME_KEY, GLOBEX_KEY = "sk-demo-acme", "sk-demo-globex"
ACME = {"authorization": f"Bearer {ACME_KEY}"}
HI = [{"role": "user", "content": "hi"}]


class Gateway:
    def __init__(self, url: str, workdir: Path) -> None:
        self.url = url
        self.usage = workdir / "usage.jsonl"
        self.log = workdir / "gateway.log"
        self.client = httpx.Client(base_url=url.removesuffix("/v1"), timeout=60)

    def post(self, path: str, body: dict[str, Any] | str, headers: dict[str, str] | None = None,
             rid: str | None = None) -> httpx.Response:
        """`body` as JSON with every non-ASCII character escaped (so a lone surrogate goes
        out as the six characters \\ud800, as a client's JSON encoder writes it)."""
        raw = body if isinstance(body, str) else json.dumps(body)
        hdrs = {**(headers if headers is not None else ACME), "content-type": "application/json"}
        if rid is not None:
            hdrs["x-request-id"] = rid
        return self.client.post(path, content=raw.encode(), headers=hdrs)

    def records(self, rids: list[str], timeout: float = 15) -> dict[str, dict[str, Any]]:
        """The usage records of these request ids (written once a second: waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, dict[str, Any]] = {}
            if self.usage.exists():
                for line in self.usage.read_text().splitlines():
                    rec = json.loads(line)
                    if rec["request_id"] in rids:
                        found[rec["request_id"]] = rec
            if len(found) == len(rids) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


@pytest.fixture(scope="module")
def gw(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("input")
    cfg = demo_config(demo_model)
    cfg["server"].update({"max_body_bytes": "4MiB", "log_format": "json",
                          "usage_log": str(workdir / "usage.jsonl")})
    with running_gateway(cfg, workdir, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}) as url:
        gateway = Gateway(url, workdir)
        yield gateway
        gateway.client.close()


def rid() -> str:
    return "t-" + uuid.uuid4().hex


def error(r: httpx.Response, status: int, param: str | None, code: str | None = None
          ) -> dict[str, Any]:
    """The OpenAI-shaped error of `r`, checked for its status, param and code."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def nested_schema(depth: int) -> str:
    """A schema `depth` objects deep, as JSON text (json.dumps would recurse)."""
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth


def chat_with(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "max_tokens": 2, "messages": HI, **fields}


# ---- 5: invalid Unicode is a 400 naming the field ------------------------------------------

SURROGATES = [
    ("/v1/chat/completions", chat_with(messages=[{"role": "user", "content": "a\ud800b"}]),
     "messages[0].content"),
    ("/v1/chat/completions", {**chat_with(), "model": "demo\udc00"}, "model"),
    ("/v1/chat/completions", chat_with(tools=[{"type": "function", "function": {
        "name": "f", "description": "\ud800", "parameters": {"type": "object"}}}]),
     "tools[0].function.description"),
    ("/v1/completions", {"model": "demo", "max_tokens": 2, "prompt": "x\udfff"}, "prompt"),
    ("/v1/responses", {"model": "demo", "max_output_tokens": 2, "input": "\ud800"}, "input"),
    ("/v1/responses", {"model": "demo", "max_output_tokens": 2, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "\udbff"}]}]},
     "input[0].content[0].text"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATES)
def test_5_a_lone_surrogate_is_a_400_naming_its_field(gw: Gateway, path: str,
                                                     body: dict[str, Any], param: str) -> None:
    logged = gw.log.stat().st_size
    err = error(gw.post(path, body), 400, param, "invalid_unicode")
    assert "Unicode" in err["message"]
    time.sleep(0.2)
    with gw.log.open("rb") as f:
        f.seek(logged)
        new = f.read().decode("utf-8", "replace").splitlines()
    for line in new:  # log_format json: nothing but JSON lines, and no traceback among them
        assert "Traceback" not in json.loads(line).get("exception", ""), line


# ---- 6: every request writes its usage record, whatever it carried --------------------------


def test_6_every_request_writes_its_usage_record(gw: Gateway) -> None:
    sent = {
        # a lone surrogate in `user` / `metadata`: a 400 now, and its record written
        rid(): (chat_with(user="u\ud800"), 400),
        rid(): (chat_with(metadata={"team": "x\udc00"}), 400),
        rid(): (chat_with(metadata={"\ud800": "x"}), 400),
        # odd but valid Unicode is served, and recorded as sent
        rid(): (chat_with(user="\U0001f600 \u202e\u0000\ufffe", metadata={"k\u200d": "\U0001f600"}),
                200),
    }
    for key, (body, status) in sent.items():
        r = gw.post("/v1/chat/completions", body, rid=key)
        assert r.status_code == status, r.text
    records = gw.records(list(sent))
    assert set(records) == set(sent), "a request without its usage record"
    for key, (_, status) in sent.items():
        assert records[key]["status"] == status
    served = records[list(sent)[-1]]
    assert served["tenant"] == "acme" and served["model"] == "demo"
    assert served["user"] == "\U0001f600 \u202e\u0000\ufffe"
    assert served["metadata"] == {"k\u200d": "\U0001f600"} and served["completion_tokens"] > 0


# ---- 7: nesting is bounded (request_bounds.max_nesting, 64) ---------------------------------


def test_7_deep_nesting_is_a_400_naming_the_param(gw: Gateway) -> None:
    deep = nested_schema(500)  # 1,000 levels: a RecursionError, a 500, before

    def rf(schema: str) -> str:
        return ('{"model":"demo","max_tokens":2,"messages":[{"role":"user","content":"hi"}],'
                '"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":'
                + schema + "}}}")

    error(gw.post("/v1/chat/completions", rf(deep)), 400, "response_format.json_schema.schema",
          "nesting_too_deep")
    # deeper than a JSON parser goes: named by its top-level field, read from the bytes
    error(gw.post("/v1/chat/completions", rf(nested_schema(3000))), 400, "response_format",
          "nesting_too_deep")
    tools = ('{"model":"demo","max_tokens":2,"messages":[{"role":"user","content":"hi"}],'
             '"tools":[{"type":"function","function":{"name":"f","parameters":' + deep + "}}]}")
    error(gw.post("/v1/chat/completions", tools), 400, "tools[0].function.parameters",
          "nesting_too_deep")
    resp = ('{"model":"demo","max_output_tokens":2,"input":"hi","text":{"format":'
            '{"type":"json_schema","name":"n","schema":' + nested_schema(40) + "}}}")
    error(gw.post("/v1/responses", resp), 400, "text.format.schema", "nesting_too_deep")
    arrays = '{"model":"demo","max_tokens":2,"prompt":"hi","user":' + "[" * 64 + "]" * 64 + "}"
    error(gw.post("/v1/completions", arrays), 400, "user[0]", "nesting_too_deep")


# ---- 8: logit_bias ----------------------------------------------------------------------------


def test_8_logit_bias_keys_and_entries_are_bounded(gw: Gateway) -> None:
    error(gw.post("/v1/chat/completions", chat_with(logit_bias={"9" * 5000: 1})), 400,
          "logit_bias", "invalid_value")
    error(gw.post("/v1/chat/completions", chat_with(logit_bias={"\u00b2": 1})), 400,
          "logit_bias", "invalid_value")  # a digit to str.isdigit(), not to int()
    many = {str(i): 0 for i in range(1025)}
    err = error(gw.post("/v1/chat/completions", chat_with(logit_bias=many)), 400, "logit_bias")
    assert "1024" in err["message"]
    fits = {str(i): 0 for i in range(1024)}  # the demo's vocabulary holds 2,048 ids
    assert gw.post("/v1/chat/completions", chat_with(logit_bias=fits)).status_code == 200


# ---- 9: schemas summed, messages, stop ---------------------------------------------------------


def flat_schema(size: int) -> dict[str, Any]:
    """A schema of about `size` bytes as JSON, quick to compile (plain string properties)."""
    n = size // 28  # '"p00000":{"type":"string"},'
    return {"type": "object", "properties": {f"p{i:05d}": {"type": "string"} for i in range(n)}}


def test_9_schemas_are_bounded_on_their_sum(gw: Gateway) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    big = {"type": "json_schema", "json_schema": {"name": "s", "schema": flat_schema(200_000)}}
    err = error(gw.post("/v1/chat/completions", chat_with(tools=[tool], response_format=big)),
                400, "response_format.json_schema.schema", "schema_too_large")
    assert str(64 * 1024) in err["message"]
    # two schemas under the bound alone, over it together: the second one is named
    half = {"type": "json_schema", "json_schema": {"name": "s", "schema": flat_schema(40_000)}}
    tools = [{"type": "function", "function": {"name": "g", "parameters": flat_schema(40_000)}}]
    error(gw.post("/v1/chat/completions", chat_with(tools=tools, response_format=half)), 400,
          "tools[0].function.parameters", "schema_too_large")
    resp = {"model": "demo", "max_output_tokens": 2, "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "s", "schema": flat_schema(40_000)}},
            "tools": [{"type": "function", "name": "g", "parameters": flat_schema(40_000)}]}
    error(gw.post("/v1/responses", resp), 400, "tools[0].parameters", "schema_too_large")


def test_9_messages_input_items_and_stop_are_bounded(gw: Gateway) -> None:
    turns = [{"role": "user", "content": "w"}] * 2049
    error(gw.post("/v1/chat/completions", chat_with(messages=turns)), 400, "messages",
          "array_above_max_length")
    items = [{"role": "user", "content": "w"}] * 2049
    error(gw.post("/v1/responses", {"model": "demo", "max_output_tokens": 2, "input": items}),
          400, "input", "array_above_max_length")
    stops = [f"s{i}" for i in range(17)]
    error(gw.post("/v1/chat/completions", chat_with(stop=stops)), 400, "stop",
          "array_above_max_length")
    assert gw.post("/v1/chat/completions", chat_with(stop=stops[:16])).status_code == 200


# ---- 13: keys never reach the usage log or the logs ----------------------------------------


def test_13_keys_are_redacted_wherever_they_appear(gw: Gateway) -> None:
    # the scheme is case-insensitive (RFC 9110), for tenants and the admin alike; nothing else
    for scheme in ("Bearer", "BEARER", "bearer"):
        auth = {"authorization": f"{scheme} {ACME_KEY}"}
        assert gw.client.get("/v1/models", headers=auth).status_code == 200
        admin = {"authorization": f"{scheme} {ADMIN_KEY}"}
        assert gw.client.get("/debug/memory", headers=admin).status_code == 200
    assert gw.client.get("/v1/models", headers={"authorization": f"Bearer\t{ACME_KEY}"}
                         ).status_code == 401
    # a key as the request id first (x-request-id takes sane characters): its record is
    # written before the later ones', which are waited for
    assert gw.post("/v1/chat/completions", chat_with(), rid=ACME_KEY).status_code == 200
    leaks = {
        rid(): chat_with(user=f"BEARER {ACME_KEY}"),
        rid(): chat_with(user=f"my key is {GLOBEX_KEY}, thanks"),
        rid(): chat_with(metadata={ADMIN_KEY: "x", "note": f"token={ACME_KEY};",
                                   "auth": f"bearer {ADMIN_KEY}"}),
    }
    for key, body in leaks.items():
        assert gw.post("/v1/chat/completions", body, rid=key).status_code == 200
    records = gw.records(list(leaks))
    assert len(records) == 3
    text = gw.usage.read_text()
    for key in (ACME_KEY, GLOBEX_KEY, ADMIN_KEY):
        assert key not in text, f"{key} in the usage log"
        assert key not in gw.log.read_text(), f"{key} in the gateway's log"
    first, second, third = (records[k] for k in leaks)
    assert first["user"] == "[redacted]"
    assert second["user"] == "my key is [redacted], thanks"
    assert third["metadata"] == {"[redacted]": "x", "note": "token=[redacted];",
                                 "auth": "[redacted]"}
    assert any(json.loads(line)["request_id"] == "[redacted]" for line in text.splitlines())


# ---- 14: another tenant's adapter is a name that exists nowhere -----------------------------


def test_14_another_tenants_adapter_answers_like_an_unknown_one(gw: Gateway) -> None:
    theirs = error(gw.post("/v1/chat/completions", chat_with(model="demo:globex-legal")), 404,
                   "model", "model_not_found")
    unknown = error(gw.post("/v1/chat/completions", chat_with(model="demo:no-such")), 404,
                    "model", "model_not_found")
    assert theirs["message"].replace("globex-legal", "X") == unknown["message"].replace(
        "no-such", "X")
    assert theirs["type"] == unknown["type"]
    for name in ("demo:globex-legal", "demo:anything", "demo:"):
        r = gw.client.get(f"/v1/models/{name}", headers=ACME)
        got = error(r, 404, "model", "model_not_found")
        assert got["message"] == f"The model '{name}' does not exist or you do not have access to it."
    for name in ("demo", "demo:acme-support"):  # its own adapter: as before
        assert gw.client.get(f"/v1/models/{name}", headers=ACME).status_code == 200
    own = gw.post("/v1/chat/completions", chat_with(model="demo:acme-support"))
    assert own.status_code == 200 and own.headers["x-gateway-adapter"] == "acme-support"


# ---- 17: no Python error text in a 400 ---------------------------------------------------------

PYTHON_TEXT = ("object is not", "can only concatenate", "Traceback", "not iterable",
               "NoneType", "Error:", "<class", "unsupported operand", "has no attribute")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", chat_with(messages=[
        *HI, {"role": "assistant", "content": None, "tool_calls": 5}]), "messages[1].tool_calls"),
    ("/v1/chat/completions", chat_with(messages=[
        *HI, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": 5}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", chat_with(messages=[
        *HI, {"role": "assistant", "content": None, "tool_calls": ["f"]}]),
     "messages[1].tool_calls[0].function"),
    ("/v1/responses", {"model": "demo", "max_output_tokens": 2, "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": 5},
        {"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].arguments"),
    ("/v1/responses", {"model": "demo", "max_output_tokens": 2, "input": [
        {"type": "function_call", "call_id": "c", "name": 7, "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0].name"),
])
def test_17_a_400_holds_no_python_error_text(gw: Gateway, path: str, body: dict[str, Any],
                                             param: str) -> None:
    err = error(gw.post(path, body), 400, param)
    for fragment in PYTHON_TEXT:
        assert fragment not in err["message"], err


# ---- 18: Responses fields are typed as OpenAI types them ----------------------------------------


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": "demo", "max_output_tokens": 2, "input": "hi", **fields}


@pytest.mark.parametrize(("body", "param"), [
    (responses(instructions=5), "instructions"),
    (responses(instructions={"a": 1}), "instructions"),
    (responses(text="json"), "text"),
    (responses(text={"format": "json"}), "text.format"),
    (responses(metadata="m"), "metadata"),
    (responses(metadata={"k": 5}), "metadata.k"),
    (responses(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
    (responses(metadata={"k" * 65: "v"}), "metadata"),
    (responses(metadata={"k": "v" * 513}), "metadata.k"),
    (responses(input=[{"type": "function_call_output", "call_id": "c1", "output": "x"}]),
     "input[0].call_id"),
    (responses(input=[{"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                      {"type": "function_call_output", "call_id": "c1", "output": "x"}]),
     "input[1].call_id"),
])
def test_18_responses_fields_of_the_wrong_type_are_a_400(gw: Gateway, body: dict[str, Any],
                                                         param: str) -> None:
    error(gw.post("/v1/responses", body), 400, param)


def test_18_well_typed_responses_fields_are_served(gw: Gateway) -> None:
    ok = responses(instructions="Be brief.", text={"format": {"type": "text"}},
                   metadata={f"k{i}": "v" * 512 for i in range(16)},
                   input=[{"type": "function_call", "call_id": "c1", "name": "f",
                           "arguments": "{}"},
                          {"type": "function_call_output", "call_id": "c1", "output": "4"}])
    r = gw.post("/v1/responses", ok)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response"
