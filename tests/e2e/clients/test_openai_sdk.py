"""The official openai SDK, as an application uses it: `.parse()` with a pydantic model, a
tools round trip with a tool result message, logprobs, n=2, streamed tool-call deltas the SDK
accumulates; against the local demo and a recording upstream."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import openai
from pydantic import BaseModel, Field

from tests.e2e.clients.conftest import Target


class Ticket(BaseModel):
    title: str = Field(max_length=20)
    priority: Literal["low", "high"]
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=2)


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)


def sdk(t: Target) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.url, api_key="sk-demo-acme", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model(target: Target) -> None:
    done = sdk(target).chat.completions.parse(
        model=target.model, messages=[{"role": "user", "content": "File a ticket."}],
        response_format=Ticket, max_tokens=200)
    ticket = done.choices[0].message.parsed
    assert isinstance(ticket, Ticket) and done.choices[0].finish_reason == "stop"


def test_tools_round_trip_with_a_tool_result(target: Target) -> None:
    client = sdk(target)
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model=target.model, messages=messages,  # type: ignore[arg-type]
                                           tools=tools, tool_choice="required", max_tokens=120,
                                           parallel_tool_calls=False)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.tool_calls
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    GetWeather.model_validate_json(call.function.arguments)  # type: ignore[union-attr]
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "rain, 7 C"}]
    second = client.chat.completions.create(model=target.model, messages=messages,  # type: ignore[arg-type]
                                            tools=tools, tool_choice="none", max_tokens=30)
    assert isinstance(second.choices[0].message.content, str)
    assert second.usage is not None and first.usage is not None
    if target.local:  # the call and its result are in the second prompt (the template renders them)
        assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_logprobs_and_n(target: Target) -> None:
    r = sdk(target).chat.completions.create(
        model=target.model, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
        top_logprobs=2, max_tokens=8, n=2 if target.local else 1)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content and lp.content[0].top_logprobs
    assert all(t.logprob <= 0 for t in lp.content)
    if target.local:
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            assert c.logprobs is not None and c.logprobs.content
            text = "".join(t.token for t in c.logprobs.content)
            assert text.startswith(c.message.content or "") or (c.message.content or "") in text


def test_streamed_tool_call_deltas_accumulate(target: Target) -> None:
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    deltas = 0
    with sdk(target).chat.completions.stream(
            model=target.model, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=120) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                deltas += 1
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and deltas >= 1
    parsed = calls[0].function.parsed_arguments  # type: ignore[union-attr]
    assert isinstance(parsed, GetWeather)
    assert json.loads(calls[0].function.arguments) == parsed.model_dump()  # type: ignore[union-attr]
