"""A synthetic tool-calling task with checkable calls (docs/tools.md): two tools and small talk.

- "What is 3 plus 5?" -> `add(a=3, b=5)`, the tool returns 8, the answer says so;
- "What colour is a lime?" -> `colour(fruit="lime")`, the tool returns the colour;
- a greeting ("Good morning!") -> a direct answer, no call.

Every call is a function of the prompt, so call accuracy and argument accuracy are exact. Held
out: the `add` number pairs whose hash falls on the held-out side never occur in training
prompts, so calling `add` with them needs copying the numbers, not memory.
"""

from __future__ import annotations

import hashlib
import json
import random

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "colour",
            "description": "The colour of a fruit.",
            "parameters": {"type": "object", "properties": {"fruit": {"type": "string"}}},
        },
    },
]
FRUITS = {
    "apple": "red",
    "banana": "yellow",
    "lime": "green",
    "plum": "purple",
    "cherry": "red",
    "lemon": "yellow",
    "kiwi": "brown",
    "grape": "green",
}
GREETINGS = ("Hello!", "Good morning!", "Hi there!", "Good evening!", "Hey!")
ANSWER = "Hello! How can I help?"


def is_heldout_pair(a: int, b: int) -> bool:
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] < 32  # about 1 pair in 8


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _item(rng: random.Random, heldout: bool) -> tuple[str, dict | None, str | None, str]:
    """(prompt, the expected call or None, the tool's result, the final answer)."""
    kind = rng.random()
    if kind < 0.45:
        while True:
            a, b = rng.randrange(10), rng.randrange(10)
            if is_heldout_pair(a, b) == heldout:
                break
        return (
            f"What is {a} plus {b}?",
            _call("add", {"a": a, "b": b}),
            str(a + b),
            f"{a} plus {b} is {a + b}.",
        )
    if kind < 0.85:
        fruit = rng.choice(sorted(FRUITS))
        colour = FRUITS[fruit]
        return (
            f"What colour is a {fruit}?",
            _call("colour", {"fruit": fruit}),
            colour,
            f"A {fruit} is {colour}.",
        )
    return rng.choice(GREETINGS), None, None, ANSWER


def training_records(count: int, seed: int) -> list[dict]:
    """Whole tool-use chats (OpenAI messages): the call, the tool's result, the final answer."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt, call, result, answer = _item(rng, heldout=False)
        messages = [{"role": "user", "content": prompt}]
        if call is not None:
            messages += [
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": result},
            ]
        messages.append({"role": "assistant", "content": answer})
        records.append({"tools": TOOLS, "messages": messages})
    return records


def eval_records(count: int, seed: int) -> list[dict]:
    """Held-out prompts whose last assistant turn is the expected call (or the direct answer)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt, call, _, answer = _item(rng, heldout=True)
        expected = (
            {"role": "assistant", "content": None, "tool_calls": [call]}
            if call
            else {"role": "assistant", "content": answer}
        )
        records.append({"tools": TOOLS, "messages": [{"role": "user", "content": prompt}, expected]})
    return records
