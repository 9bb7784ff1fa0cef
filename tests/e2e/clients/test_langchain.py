"""LangChain's ChatOpenAI: bind_tools and with_structured_output (json_schema, its default),
against the local demo and a recording upstream."""

from __future__ import annotations

from typing import Annotated, Literal

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.e2e.clients.conftest import Target


class Answer(BaseModel):
    """A short answer."""

    verdict: Literal["yes", "no"]
    reason: str = Field(max_length=24)


@tool
def lookup_order(order_id: Annotated[str, Field(max_length=8)]) -> str:
    """Look an order up by its id."""
    return "shipped"


def chat(t: Target) -> ChatOpenAI:
    return ChatOpenAI(model=t.model, base_url=t.url, api_key="sk-demo-acme",  # type: ignore[arg-type]
                      max_retries=0, max_tokens=120, timeout=120)


def test_bind_tools(target: Target) -> None:
    msg = chat(target).bind_tools([lookup_order], tool_choice="required").invoke(
        "Where is order 42?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "lookup_order"  # type: ignore[attr-defined]
    assert isinstance(msg.tool_calls[0]["args"]["order_id"], str)  # type: ignore[attr-defined]


def test_with_structured_output(target: Target) -> None:
    answer = chat(target).with_structured_output(Answer).invoke("Is the sky blue?")
    assert isinstance(answer, Answer) and answer.verdict in ("yes", "no")
