"""pydantic-ai against the local demo, as its docs use it: structured output with a nested
model (its default tool output: a `final_result` tool whose parameters hold `$defs` and
`$ref`), a function tool whose argument is a nested model (a required call, as pydantic-ai
sends it without an agent loop), and streamed text."""

from __future__ import annotations

import asyncio

import pytest

pydantic_ai = pytest.importorskip("pydantic_ai")

from pydantic import BaseModel  # noqa: E402
from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.direct import model_request  # noqa: E402
from pydantic_ai.messages import ModelRequest, ToolCallPart  # noqa: E402
from pydantic_ai.models import ModelRequestParameters  # noqa: E402
from pydantic_ai.models.openai import OpenAIChatModel  # noqa: E402
from pydantic_ai.providers.openai import OpenAIProvider  # noqa: E402
from pydantic_ai.tools import ToolDefinition  # noqa: E402


class City(BaseModel):
    name: str
    country: str


class Trip(BaseModel):
    city: City
    days: int


def model(url: str) -> OpenAIChatModel:
    return OpenAIChatModel("demo", provider=OpenAIProvider(base_url=url, api_key="sk-demo-acme"))


def test_structured_output_with_a_nested_model(demo_gateway: str) -> None:
    agent = Agent(
        model(demo_gateway),
        output_type=Trip,
        model_settings={"max_tokens": 80, "temperature": 0, "seed": 1},
    )
    result = agent.run_sync("Plan a trip to Paris.")
    assert isinstance(result.output, Trip) and isinstance(result.output.city, City)
    calls = [
        p
        for m in result.all_messages()
        for p in getattr(m, "parts", ())
        if isinstance(p, ToolCallPart)
    ]
    assert [c.tool_name for c in calls] == ["final_result"]  # one call, no retry


def test_a_function_tool_with_a_nested_argument(demo_gateway: str) -> None:
    # The demo model writes nested arguments poorly (it learned flat ones): this pins a
    # request it completes; what is tested is the schema's `$defs`/`$ref` reaching the
    # grammar and the typed result coming back.
    class Place(BaseModel):
        city: str

    class Booking(BaseModel):
        place: Place
        traveller: str

    tool = ToolDefinition(
        name="book_trip",
        description="Book a trip.",
        parameters_json_schema=Booking.model_json_schema(),
    )
    assert "$defs" in tool.parameters_json_schema  # what used to be a 400
    response = asyncio.run(
        model_request(
            model(demo_gateway),
            [ModelRequest.user_text_prompt("Book a trip to Oslo for Ann.")],
            model_settings={
                "max_tokens": 120,
                "temperature": 0,
                "seed": 1,
                "tool_choice": "required",
            },
            model_request_parameters=ModelRequestParameters(
                function_tools=[tool], allow_text_output=False
            ),
        )
    )
    (call,) = [p for p in response.parts if isinstance(p, ToolCallPart)]
    assert call.tool_name == "book_trip" and response.finish_reason == "tool_call"
    booking = Booking.model_validate(call.args_as_dict())
    assert isinstance(booking.place, Place)


def test_streamed_text(demo_gateway: str) -> None:
    agent = Agent(model(demo_gateway), model_settings={"max_tokens": 24, "seed": 3})

    async def stream() -> tuple[list[str], str]:
        async with agent.run_stream("How long does shipping take?") as run:
            deltas = [d async for d in run.stream_text(delta=True, debounce_by=None)]
            return deltas, await run.get_output()

    deltas, output = asyncio.run(stream())
    assert len(deltas) > 1 and "".join(deltas) == output and output.strip()
