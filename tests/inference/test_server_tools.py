"""OpenAI `tools` on `lmforge serve` (docs/tools.md), through the real `openai` client and the
tiny model trained on the synthetic tool task: a request with tools gets `tool_calls`
(finish_reason tool_calls), the tool's result goes back as a `tool` message and the model
answers; streamed as `delta.tool_calls`; tool_choice none / required / a named function; and
malformed tool messages refused with a 400 naming the message, never a 500."""

from __future__ import annotations

import json
import re

import openai
import pytest

from helpers import http, serving
from lmforge.data.tool_task import TOOLS
from lmforge.inference.server import create_app, load_served

KEY = "test-key"
pytestmark = pytest.mark.xdist_group("quickstart")


@pytest.fixture(scope="module")
def server(tool_model):
    model, _ = tool_model
    with serving(create_app(load_served(str(model), {}, name="tools"), KEY, 12)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def ask(client, messages, **extra):
    return client.chat.completions.create(
        model="tools", messages=messages, tools=TOOLS, temperature=0, max_tokens=48, **extra
    )


def test_the_openai_client_runs_a_whole_tool_loop(client):
    messages = [{"role": "user", "content": "What colour is a lime?"}]
    first = ask(client, messages).choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.function.name == "colour" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"fruit": "lime"}  # arguments: a JSON object string
    messages += [
        first.message.model_dump(exclude_none=True),  # the assistant turn as the client sends it back
        {"role": "tool", "tool_call_id": call.id, "content": "green"},
    ]
    final = ask(client, messages).choices[0]
    assert final.finish_reason == "stop" and final.message.tool_calls is None
    assert final.message.content == "A lime is green."


def test_a_greeting_is_answered_without_a_call(client):
    reply = ask(client, [{"role": "user", "content": "Good morning!"}]).choices[0]
    assert reply.finish_reason == "stop" and reply.message.tool_calls is None
    assert reply.message.content == "Hello! How can I help?"


def test_streamed_calls_arrive_as_delta_tool_calls(client):
    chunks = list(ask(client, [{"role": "user", "content": "What is 3 plus 4?"}], stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "add" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"a": 3, "b": 4}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_streamed_answer_without_a_call_streams_as_it_comes(client):
    """Text that cannot be part of a call is sent as it is generated, not held to the end."""
    chunks = list(ask(client, [{"role": "user", "content": "Good morning!"}], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == "Hello! How can I help?"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice_none_required_and_named(client):
    """none: the tools are not offered (no call comes back); required: the answer starts with a
    call block; a named function: the call block starts with its name, so that tool is called
    even where another fits."""
    sums = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert ask(client, sums).choices[0].message.tool_calls[0].function.name == "add"
    assert ask(client, sums, tool_choice="none").choices[0].message.tool_calls is None
    forced = ask(client, sums, tool_choice="required").choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls
    named = ask(client, sums, tool_choice={"type": "function", "function": {"name": "colour"}}).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["colour"]


@pytest.mark.parametrize(
    ("messages", "extra", "message"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}],
            {},
            "must answer a tool call",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{a"}}],
                },
                {"role": "tool", "content": "5"},
            ],
            {},
            r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON",
        ),
        ([{"role": "user", "content": None}], {}, r"messages\[0\] has no content"),
        (
            [{"role": "user", "content": "hi"}],
            {"tool_choice": {"type": "function", "function": {"name": "mul"}}},
            "tool_choice names 'mul', which is not in tools",
        ),
    ],
)
def test_malformed_tool_requests_get_a_400_naming_the_field(server, messages, extra, message):
    body = {"model": "tools", "messages": messages, "tools": TOOLS, **extra}
    status, text = http("POST", f"{server}/v1/chat/completions", body)
    assert status == 400, text
    assert re.search(message, json.loads(text)["error"]["message"])


def test_tool_calls_null_and_content_beside_calls_are_accepted(client):
    messages = [
        {"role": "user", "content": "What is 1 plus 2?"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "1 plus 2 is 3.", "tool_calls": None},
        {"role": "user", "content": "Hello!"},
    ]
    body = {"model": "tools", "messages": messages, "temperature": 0, "max_tokens": 24}
    reply = client.chat.completions.create(**body)
    assert reply.choices[0].message.content


def test_a_template_without_a_tool_format_refuses_tools(base_dir):
    served = load_served(str(base_dir), {}, name="tiny", template="llama3")
    with serving(create_app(served, KEY, 12)) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
        status, text = http("POST", f"{url}/v1/chat/completions", body)
    assert status == 400 and "has no tool format" in json.loads(text)["error"]["message"]


def test_an_unreadable_call_comes_back_as_content(tmp_path, tokenizer):
    """A random model made to call (tool_choice names a function) writes no valid call JSON:
    plain content and a 200, never a 500."""
    from lmforge.models.tiny import build_tiny_llama, save_tiny

    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_positions=4096, seed=0)
    served = load_served(
        str(save_tiny(model, tokenizer, tmp_path / "random")), {}, name="tiny", template="chatml"
    )
    with serving(create_app(served, KEY, 12)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        forced = {"type": "function", "function": {"name": "add"}}
        messages = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice=forced, max_tokens=8
        ).choices[0]
    assert reply.message.tool_calls is None and reply.finish_reason == "length"
    assert reply.message.content.startswith('<tool_call>\n{"name": "add')


def test_chat_shows_each_call_and_answers_with_the_typed_result(tool_model, tmp_path):
    """`lmforge chat --tools FILE`: the model's call is shown, the user types its result, and the
    model answers with it in the history; a greeting is answered without a call."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    model, _ = tool_model
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    command = [
        "chat",
        "--model",
        str(model),
        "--tools",
        str(tools),
        "--temperature",
        "0",
        "--max-new-tokens",
        "48",
    ]
    typed = "What colour is a lime?\ngreen\n/reset\nGood morning!\n/exit\n"
    result = CliRunner().invoke(app, command, input=typed)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("tool call: colour(") == 1 and "result of colour:" in out
    assert out.count("assistant") == 3  # the call, the answer after the result, the greeting's answer
    assert "Hello! How can I help?" in out
    refused = CliRunner().invoke(app, [*command, "--template", "llama3"], input="hi\n/exit\n")
    assert refused.exit_code == 1 and "has no tool format" in refused.output
