"""Tool-use data (docs/tools.md): records as users write them (OpenAI `tool_calls` / `tool`
messages and `tools`, LLaMA-Factory's `function_call` / `observation` turns and `tools` column
through dataset_info.json), rendered in Qwen2.5's Hermes format token for token as its official
template renders them on every tokenizer family, with only the assistant's text and calls learned."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import corpus
from helpers import OFFICIAL_TEMPLATES
from lmforge.config.data import DataConfig
from lmforge.data.files import DataError
from lmforge.data.formats import problems, to_example
from lmforge.data.loader import load_examples
from lmforge.data.templates import Conversation, ToolCall, get_template
from lmforge.data.tokenize import IGNORE, encode_conversation
from tokenizer_families import FAMILIES, build_family

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"name": "add", "description": "Add two numbers.", "parameters": {"type": "object"}}  # bare schema

OPENAI_RECORD = {
    "tools": [WEATHER, ADD],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and 2+3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21°C"},
        {"role": "tool", "tool_call_id": "c2", "content": "5"},
        {"role": "assistant", "content": "Sunny, 21°C; 2+3 is 5."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome.", "tool_calls": None},
    ],
}


def test_openai_tool_messages_read_into_calls_and_results():
    example = to_example(OPENAI_RECORD, "f.jsonl #1", "messages")
    assert example.tools == (WEATHER, ADD)
    assert example.turns == (
        ("Weather in Paris and 2+3?", ""),
        ("", "Sunny, 21°C; 2+3 is 5."),
        ("Thanks!", "You're welcome."),
    )
    assert example.calls == {
        0: (ToolCall("get_weather", {"city": "Paris"}, "c1"), ToolCall("add", {"a": 2, "b": 3}, "c2"))
    }
    assert example.results == {1: ("sunny, 21°C", "5")}
    assert example.kind == "sft" and problems(example, "sft") == []


def test_a_turn_with_text_and_calls_keeps_both():
    record = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}],
            },
        ]
    }
    example = to_example(record, "f #1", "messages")
    assert example.turns == (("Weather?", "Let me check."),)
    assert example.calls == {0: (ToolCall("get_weather", {}),)}
    assert example.kind == "sft"


def llama_factory_records() -> list[dict]:
    """LLaMA-Factory's sharegpt tool data: `tools` a JSON string, calls as JSON text."""
    return [
        {
            "conversations": [
                {"from": "human", "value": "What is 2+3?"},
                {
                    "from": "function_call",
                    "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}}),
                },
                {"from": "observation", "value": "5"},
                {"from": "gpt", "value": "2+3 is 5."},
            ],
            "tools": json.dumps([ADD]),
        }
    ]


def test_llama_factory_function_call_and_observation_turns_through_dataset_info(tmp_path):
    (tmp_path / "tools.json").write_text(json.dumps(llama_factory_records()))
    entry = {
        "file_name": "tools.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall": entry}))
    data = DataConfig(path="glaive_toolcall", dataset_dir=str(tmp_path), template="qwen2.5")
    (example,) = load_examples(data, "sft").train
    assert example.tools == (ADD,)
    assert example.turns == (("What is 2+3?", ""), ("", "2+3 is 5."))
    assert example.calls == {0: (ToolCall("add", {"a": 2, "b": 3}),)}
    assert example.results == {1: ("5",)}


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a: 2}"}}]},
            r"f.jsonl #3: messages\[1\]: `tool_calls\[0\].arguments` is not valid JSON",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "[1, 2]"}}]},
            r"`tool_calls\[0\].arguments` is a list; expected a JSON object",
        ),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "has no function `name`"),
        ({"role": "tool", "content": "5"}, r"a tool result with no tool call before it \(message 1\)"),
    ],
)
def test_malformed_tool_records_name_the_record_and_field(message, error):
    record = {"messages": [{"role": "user", "content": "2+3?"}, message]}
    with pytest.raises(DataError, match=error):
        to_example(record, "f.jsonl #3", "messages")


def test_tools_that_are_not_function_schemas_are_refused():
    with pytest.raises(DataError, match=r"f #2: tools\[0\] must be a function schema with a `name`"):
        to_example({**OPENAI_RECORD, "tools": [{"description": "x"}]}, "f #2", "messages")
    with pytest.raises(DataError, match="`tools` is not valid JSON"):
        to_example({**OPENAI_RECORD, "tools": "[{"}, "f #2", "messages")


def test_stages_that_would_drop_tools_refuse_them():
    example = to_example(OPENAI_RECORD, "f #1", "messages")
    ((code, message),) = problems(example, "preference")
    assert code == "tools_unsupported" and "which only method sft trains on so far" in message


def test_a_template_without_a_tool_format_refuses_tool_data(tokenizer):
    conversation = to_example(OPENAI_RECORD, "f #1", "messages").conversation()
    with pytest.raises(ValueError, match="data.template llama3 has no format for tools.*qwen2.5 or chatml"):
        get_template("llama3").render(conversation, tokenizer)


CONVERSATIONS = [
    to_example(OPENAI_RECORD, "f #1", "messages").conversation(),
    to_example(llama_factory_records()[0], "f #2", "sharegpt").conversation(),
    Conversation(  # a call with text before it, no system: Qwen's default system holds the tools
        turns=[("Weather in Oslo?", "Checking."), ("", "Rain.")],
        tools=(WEATHER,),
        calls={0: (ToolCall("get_weather", {"city": "Oslo"}),)},
        results={1: ('{"sky": "rain"}',)},
    ),
]


def official_qwen(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (OFFICIAL_TEMPLATES / "qwen2.5.jinja").read_text(encoding="utf-8")
    return tok


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_family(request.param, corpus())


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_qwen_tool_conversations_are_the_official_templates_tokens(family, index):
    """Whole conversation and generation prompt, on byte-level BPE, SentencePiece BPE (legacy and
    not) and Unigram; the official template ends with a newline after the last <|im_end|>."""
    conversation, template = CONVERSATIONS[index], get_template("qwen2.5")
    tok = official_qwen(family)
    messages, tools = conversation.messages(), list(conversation.tools)
    official = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert template.render(conversation, tok) + "\n" == official
    ids = [i for prompt, response in template.encode(conversation, tok) for i in prompt + response]
    whole = tok(official, add_special_tokens=False)["input_ids"]
    assert ids == whole[: len(ids)] and not tok.decode(whole[len(ids) :]).strip()  # the newline
    asking = Conversation(
        turns=[*conversation.turns[:-1], (conversation.turns[-1][0], "")],
        system=conversation.system,
        tools=conversation.tools,
        calls={k: v for k, v in conversation.calls.items() if k < len(conversation.turns) - 1},
        results=conversation.results,
    )
    prompt = tok.apply_chat_template(
        asking.messages(), tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert template.generation_prompt(asking, tok) == prompt


@pytest.mark.parametrize("name", ["qwen2.5", "chatml"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_the_saved_jinja_renders_tools_as_training_does(tokenizer, name, index):
    """The chat_template lmforge saves with a model (what vLLM and transformers read)."""
    conversation, template = CONVERSATIONS[index], get_template(name)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template.jinja(tok)
    rendered = tok.apply_chat_template(
        conversation.messages(), tools=list(conversation.tools), tokenize=False
    )
    assert rendered == template.render(conversation, tok)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_the_tokenizer_template_takes_tools_from_the_official_jinja(tokenizer, index):
    """data.template: tokenizer with Qwen2.5's own template: the named template's text, but the
    newline Qwen writes after each <|im_end|> ends the turn before instead of opening the next."""
    conversation = CONVERSATIONS[index]
    tok = official_qwen(tokenizer)
    ours = get_template("tokenizer").segments(conversation, tok)
    named = get_template("qwen2.5").segments(conversation, tok)
    assert "".join(p + r for p, r in ours) == "".join(p + r for p, r in named) + "\n"
    for i, ((prompt, response), (named_prompt, named_response)) in enumerate(zip(ours, named, strict=True)):
        assert response == named_response + "\n"
        assert prompt == (named_prompt if i == 0 else named_prompt.removeprefix("\n"))


def test_only_the_assistants_text_and_calls_are_learned(tokenizer):
    """The tools list, the user turns and the tool results are masked; every call and answer
    (with its stop token) is learned."""
    conversation, template = CONVERSATIONS[0], get_template("qwen2.5")
    encoded, _ = encode_conversation(conversation, template, tokenizer, 10**6)
    learned = tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE]
    )
    assert learned == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
        "Sunny, 21°C; 2+3 is 5.<|im_end|>You're welcome.<|im_end|>"
    )
    prompt = tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE]
    )
    assert "<tools>" in prompt and "sunny, 21°C" in prompt and "<tool_response>" in prompt
