"""The OpenAI Agents SDK (Responses API, its default): an agent with a function tool, against
the local demo (Responses served over chat, tool calls grammar-constrained) and a recording
upstream (Responses passed through). Its trace export is off (conftest)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import Field

from tests.e2e.clients.conftest import Target

set_tracing_disabled(True)


def test_function_tool_over_the_responses_api(target: Target) -> None:
    calls: list[str] = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def run() -> str:
        client = AsyncOpenAI(base_url=target.url, api_key="sk-demo-acme", max_retries=0)
        agent = Agent(
            name="weather", instructions="Answer with the weather.", tools=[get_weather],
            model=OpenAIResponsesModel(model=target.model, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", max_tokens=80,
                                         parallel_tool_calls=False),  # one call: bounded
            tool_use_behavior="stop_on_first_tool",
        )
        result = await Runner.run(agent, "What is the weather in Oslo?",
                                  run_config=RunConfig(tracing_disabled=True), max_turns=3)
        await client.close()
        return str(result.final_output)

    output = asyncio.run(run())
    assert len(calls) == 1 and output == f"sunny in {calls[0]}"


def test_responses_previous_id_needs_a_native_upstream(target: Target) -> None:
    import openai

    client = openai.OpenAI(base_url=target.url, api_key="sk-demo-acme", max_retries=0)
    if target.local:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=target.model, input="hi", previous_response_id="resp_1")
        assert "previous_response_id" in str(info.value)
    else:
        r = client.responses.create(model=target.model, input="hi", previous_response_id="resp_1")
        assert r.id == "resp_up_42"
