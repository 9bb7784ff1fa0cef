"""The demo model's JSON lessons: short JSON answers and tool calls, generated (fixed seed).

Grammar-constrained decoding keeps the model's output in shape, but only the model can end
a free string or a number: a model that never saw JSON never chooses the closing quote.
These dialogues teach it to: JSON answers as the engine's JSON grammar writes them (`", "`
and `": "` separators, what `response_format` forces), and tool calls in the engine's own
format (the chat template's tools section in the system turn, then
<tool_call>{"name":...,"arguments":{...}}</tool_call> with compact arguments, as the
template writes a call back). Values are short: a word or two, a number of one to four
digits, a list of one to three items, so what the model learns is to close them.
"""

from __future__ import annotations

import json
import random
from typing import Any

Message = tuple[str, str]

CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Oslo",
    "Lima",
    "Cairo",
    "Boston",
    "Denver",
    "Sydney",
    "Toronto",
    "Seoul",
    "Dublin",
    "Vienna",
    "Prague",
    "Lisbon",
    "Chicago",
    "Austin",
    "New York",
    "San Francisco",
    "Mexico City",
]
NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Eve",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Jason",
    "Maria",
    "Omar",
    "Priya",
    "Ken",
    "Lena",
    "Sam",
    "Tara",
]
DAYS = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "tomorrow",
    "today",
    "next week",
]
EVENTS = [
    "science fair",
    "team meeting",
    "book club",
    "concert",
    "birthday party",
    "product launch",
    "yoga class",
    "job interview",
    "picnic",
    "football match",
]
ITEMS = [
    "water bottle",
    "backpack",
    "lamp",
    "kettle",
    "jacket",
    "desk chair",
    "headphones",
    "tent",
    "blender",
    "notebook",
]
WORDS = [
    "blue",
    "fast",
    "open",
    "closed",
    "pending",
    "small",
    "large",
    "red",
    "green",
    "shipped",
    "paid",
    "new",
    "old",
    "ok",
    "done",
    "high",
    "low",
    "yes",
    "no",
    "refund",
]
STATUSES = ["open", "closed", "pending", "shipped", "delivered", "cancelled"]
SYSTEMS = [
    None,
    "Answer in JSON.",
    "You extract structured data.",
    "Reply with a JSON object.",
    "Extract the event information.",
    "You are a helpful assistant.",
]

KEYS: dict[str, Any] = {  # key -> how its value is drawn
    "name": lambda r: r.choice(NAMES),
    "city": lambda r: r.choice(CITIES),
    "location": lambda r: r.choice(CITIES),
    "day": lambda r: r.choice(DAYS),
    "date": lambda r: r.choice(DAYS),
    "status": lambda r: r.choice(STATUSES),
    "item": lambda r: r.choice(ITEMS),
    "title": lambda r: r.choice(EVENTS).title(),
    "color": lambda r: r.choice(["red", "blue", "green", "black", "white"]),
    "age": lambda r: r.randint(18, 80),
    "count": lambda r: r.randint(0, 20),
    "celsius": lambda r: r.randint(-5, 35),
    "price": lambda r: r.randint(5, 400),
    "order_id": lambda r: r.randint(1000, 9999),
    "year": lambda r: r.randint(1990, 2030),
    "quantity": lambda r: r.randint(1, 9),
    "score": lambda r: round(r.random(), 2),
    "ok": lambda r: r.random() < 0.5,
    "in_stock": lambda r: r.random() < 0.5,
    "tags": lambda r: r.sample(WORDS, r.randint(1, 3)),
    "participants": lambda r: r.sample(NAMES, r.randint(1, 3)),
    "answer": lambda r: r.choice(WORDS),
    "reason": lambda r: " ".join(r.sample(WORDS, 2)),
    "query": lambda r: r.choice(ITEMS),
    "unit": lambda r: r.choice(["celsius", "fahrenheit"]),
    "email": lambda r: r.choice(NAMES).lower() + "@example.com",
    "summary": lambda r: f"{r.choice(NAMES)} likes the {r.choice(ITEMS)}",
}
TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}


def _answer(r: random.Random) -> tuple[str, dict[str, Any]]:
    """A question and its JSON answer."""
    kind = r.randrange(6)
    city, name, day = r.choice(CITIES), r.choice(NAMES), r.choice(DAYS)
    if kind == 0:
        q = r.choice(
            [
                "What is the weather in {c}?",
                "How warm is it in {c}?",
                "Weather in {c} please.",
                "Tell me the temperature in {c}.",
            ]
        )
        return q.format(c=city), {"city": city, "celsius": r.randint(-5, 35)}
    if kind == 1:
        people = r.sample(NAMES, r.randint(1, 3))
        event = r.choice(EVENTS)
        q = f"{' and '.join(people)} {'is' if len(people) == 1 else 'are'} going to a {event} on {day}."
        return q, {"name": event, "date": day, "participants": people}
    if kind == 2:
        age = r.randint(18, 80)
        return f"{name} is {age} years old.", {"name": name, "age": age}
    if kind == 3:
        item, oid = r.choice(ITEMS), r.randint(1000, 9999)
        return (
            (f"Where is my order {oid}?", {"order_id": oid, "status": r.choice(STATUSES)})
            if r.random() < 0.5
            else (f"Do you have the {item}?", {"item": item, "in_stock": r.random() < 0.5})
        )
    keys = r.sample(sorted(KEYS), r.randint(1, 4))
    obj = {k: KEYS[k](r) for k in keys}
    q = r.choice(
        [
            "Give me a record with {k}.",
            "Fill in {k}.",
            "Return {k} as JSON.",
            "Make an example with {k}.",
            "{k}?",
        ]
    )
    return q.format(k=", ".join(keys)), obj


def _schema(obj: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for k, v in obj.items():
        props[k] = {"type": TYPES[type(v)]}
        if isinstance(v, list):
            props[k]["items"] = {"type": "string"}
    return {"type": "object", "properties": props, "required": list(obj)}


def _tool(name: str, description: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": _schema(args)},
    }


def tools_system(tools: list[dict[str, Any]], system: str | None = None) -> str:
    """The system turn's content as the chat template renders it with `tools`."""
    head = f"{system}\n\n" if system else ""
    listed = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
    return (
        f"{head}# Tools\nYou may call functions. They are listed in <tools></tools>:\n"
        f'<tools>\n{listed}</tools>\nTo call one, answer with <tool_call>{{"name": '
        '<name>, "arguments": <arguments>}</tool_call>.'
    )


def _call(r: random.Random) -> tuple[list[dict[str, Any]], str, str, dict[str, Any]]:
    """Tools offered, the request, and the call that answers it (name, arguments)."""
    city, item = r.choice(CITIES), r.choice(ITEMS)
    kind = r.randrange(5)
    if kind == 0:
        args: dict[str, Any] = {"location": city}
        tool = _tool("get_weather", "Get current temperature for a given location.", args)
        q = r.choice(
            [
                "What is the weather like in {c} today?",
                "Is it cold in {c}?",
                "Weather in {c}?",
                "How hot is {c} right now?",
            ]
        ).format(c=city)
    elif kind == 1:
        args = {"city": city, "unit": r.choice(["celsius", "fahrenheit"])}
        tool = _tool("get_weather", "Get the weather for a city.", args)
        q = f"What is the temperature in {city} in {args['unit']}?"
    elif kind == 2:
        args = {"query": item}
        tool = _tool("search", "Search the catalog.", args)
        q = r.choice(["Find a {i}.", "Do you sell a {i}?", "Search for {i}."]).format(i=item)
    elif kind == 3:
        args = {"order_id": r.randint(1000, 9999)}
        tool = _tool("lookup_order", "Look up an order by its id.", args)
        q = f"Where is order {args['order_id']}?"
    else:
        keys = r.sample(sorted(KEYS), r.randint(1, 3))
        args = {k: KEYS[k](r) for k in keys}
        name = r.choice(["create_record", "update", "save", "submit", "record_event"])
        tool = _tool(name, "Store a record.", args)
        q = "Save " + ", ".join(f"{k} {json.dumps(v)}" for k, v in args.items()) + "."
    tools = [tool]
    if r.random() < 0.3:  # another tool offered, not the one called
        other = {"query": item} if tool["function"]["name"] != "search" else {"order_id": 1}
        tools.insert(
            r.randrange(2),
            _tool("search" if "query" in other else "lookup_order", "Another tool.", other),
        )
    return tools, q, tool["function"]["name"], args


def dialogues(count: int, seed: int) -> list[list[Message]]:
    """`count` dialogues: two JSON answers to each tool call."""
    r = random.Random(seed)
    out: list[list[Message]] = []
    for i in range(count):
        if i % 3 != 2:
            q, obj = _answer(r)
            system = r.choice(SYSTEMS)
            msgs: list[Message] = [("system", system)] if system else []
            out.append([*msgs, ("user", q), ("assistant", json.dumps(obj, ensure_ascii=False))])
        else:
            tools, q, name, args = _call(r)
            call = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
            content = (
                '<tool_call>{"name":' + json.dumps(name) + ',"arguments":' + call + "}</tool_call>"
            )
            system = tools_system(tools, r.choice([None, None, "You are a helpful assistant."]))
            out.append([("system", system), ("user", q), ("assistant", content)])
    return out
