"""Llama 3.1's and Mistral v0.3's tool formats (docs/tools.md), token for token as their official
templates (tests/data/chat_templates, SOURCES.md) render them on every tokenizer family, and the
Jinja template lmforge saves with a model renders what training does."""

from __future__ import annotations

import copy

import pytest

from conftest import corpus
from helpers import OFFICIAL_SPECIAL, OFFICIAL_TEMPLATES
from lmforge.data.formats import to_example
from lmforge.data.templates import (
    LLAMA_JSON,
    MISTRAL_TOOLS,
    Conversation,
    ToolCall,
    get_template,
    mistral_call_id,
    named_equivalent,
)
from lmforge.data.tokenize import IGNORE, encode_conversation
from tokenizer_families import FAMILIES, build_family

# The control tokens of the real tokenizers (single tokens there, as here).
TOOL_TOKENS = ["[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add.", "parameters": {"type": "object"}},
}

SINGLE = [  # one call per answer, as Llama 3.1 writes them
    Conversation(
        turns=[("  Weather in Paris? ", ""), ("", " Sunny, 21°C. "), ("Thanks!", "You're welcome.")],
        system=" Be brief.\n",
        tools=(WEATHER, ADD),
        calls={0: (ToolCall("get_weather", {"city": "Paris"}, id="a1b2c3d4e"),)},
        results={1: ("sunny, 21°C",)},
    ),
    Conversation(  # a call after a call, with JSON results; no system
        turns=[("What is 2+3, then +4?", ""), ("", ""), ("", "9.")],
        tools=(ADD,),
        calls={
            0: (ToolCall("add", {"a": 2, "b": 3}, id="x00000001"),),
            1: (ToolCall("add", {"a": 5, "b": 4}),),
        },
        results={1: ('{"sum": 5}',), 2: ("9",)},
    ),
    Conversation(  # tools offered, none called
        turns=[("Hi", "Hello!")],
        system="S",
        tools=(WEATHER,),
    ),
]
PARALLEL = Conversation(  # two calls in one answer (Mistral, not Llama 3.1)
    turns=[("Weather in Oslo and 2+3?", ""), ("", "Rain; 5.")],
    tools=(WEATHER, ADD),
    calls={0: (ToolCall("get_weather", {"city": "Oslo"}, id="w00000001"), ToolCall("add", {"a": 2, "b": 3}))},
    results={1: ("rain", "5")},
)
CASES = [("llama3.1", i) for i in range(len(SINGLE))] + [("mistral-v0.3", i) for i in range(len(SINGLE) + 1)]


def case(name: str, index: int) -> Conversation:
    return [*SINGLE, PARALLEL][index]


def official(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": TOOL_TOKENS}, replace_extra_special_tokens=False)
    tok.bos_token, tok.eos_token = OFFICIAL_SPECIAL[name]
    tok.chat_template = (OFFICIAL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def asking(conversation: Conversation) -> Conversation:
    """The conversation up to the last answer: a generation prompt."""
    last = len(conversation.turns) - 1
    return Conversation(
        turns=[*conversation.turns[:-1], (conversation.turns[-1][0], "")],
        system=conversation.system,
        tools=conversation.tools,
        calls={k: v for k, v in conversation.calls.items() if k < last},
        results=conversation.results,
    )


def official_render(tok, name, conversation, prompt=False):
    """The official template's text for `conversation`, given as its users give messages: every
    call with its id (Mistral's needs 9 characters) and tools in OpenAI's layout."""
    messages = get_template(name).tools.prepare(conversation).messages()
    return tok.apply_chat_template(
        messages, tools=list(conversation.tools) or None, tokenize=False, add_generation_prompt=prompt
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_family(request.param, corpus())


@pytest.mark.parametrize(("name", "index"), CASES)
def test_tool_conversations_are_the_official_templates_tokens(family, name, index):
    """The whole conversation (what training sees) and the generation prompt (what inference sends),
    on byte-level BPE, SentencePiece BPE (legacy and not) and Unigram."""
    conversation, template = case(name, index), get_template(name)
    tok = official(family, name)
    # Mistral's official template writes the system prompt only when the conversation ends with a
    # user turn (a generation prompt); lmforge keeps it in the last user turn for training too.
    whole = conversation if name == "llama3.1" else Conversation(**{**vars(conversation), "system": None})
    text = official_render(tok, name, whole)
    assert template.render(whole, tok) == text
    ids = [i for prompt, response in template.encode(whole, tok) for i in prompt + response]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    asked = asking(conversation)
    if name == "mistral-v0.3" and asked.system and len(asked.turns) - 1 in asked.results:
        asked = Conversation(**{**vars(asked), "system": None})  # after results the official drops it
    assert template.generation_prompt(asked, tok) == official_render(tok, name, asked, prompt=True)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_the_saved_jinja_renders_tools_as_training_does(tokenizer, name, index):
    """The chat_template lmforge saves (what vLLM and transformers read), on messages as clients send
    them: call ids of any length or none, results naming their call or not."""
    conversation, template = case(name, index), get_template(name)
    tok = official(tokenizer, name)
    tok.chat_template = template.jinja(tok)
    asked = asking(conversation)
    rendered = tok.apply_chat_template(
        asked.messages(), tools=list(asked.tools) or None, tokenize=False, add_generation_prompt=True
    )
    assert rendered == template.generation_prompt(asked, tok)
    # Ids as other clients write them (any length), or none: written as training writes them.
    for call_id in ("call_" + "9f" * 8, "q", None):
        calls = {
            turn: tuple(ToolCall(c.name, c.arguments, id=call_id) for c in made)
            for turn, made in conversation.calls.items()
        }
        variant = Conversation(**{**vars(conversation), "calls": calls})
        rendered = tok.apply_chat_template(
            variant.messages(), tools=list(variant.tools) or None, tokenize=False
        )
        assert rendered == template.render(variant, tok)


def test_only_answers_and_calls_are_learned(tokenizer):
    tok = official(tokenizer, "llama3.1")
    encoded, _ = encode_conversation(SINGLE[0], get_template("llama3.1"), tok, 10**6)
    learned = tok.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE]
    )
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert learned == f"{call}<|eot_id|>Sunny, 21°C.<|eot_id|>You're welcome.<|eot_id|>"
    tok = official(tokenizer, "mistral-v0.3")
    encoded, _ = encode_conversation(PARALLEL, get_template("mistral-v0.3"), tok, 10**6)
    learned = tok.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != IGNORE],
        skip_special_tokens=False,
    )
    assert learned == (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "w00000001"}, '
        '{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "000000001"}]</s> Rain; 5.</s>'
    )


def test_what_a_format_cannot_write_is_refused_with_the_reason(tokenizer):
    text_and_call = Conversation(
        turns=[("Weather?", "Let me check.")], tools=(WEATHER,), calls={0: (ToolCall("get_weather", {}),)}
    )
    for name in ("llama3.1", "mistral-v0.3"):
        with pytest.raises(
            ValueError,
            match=f"{name}'s format writes an answer that calls as the call alone.*qwen2.5, chatml",
        ):
            get_template(name).render(text_and_call, tokenizer)
    with pytest.raises(ValueError, match="one call per answer, and this answer makes 2"):
        get_template("llama3.1").render(PARALLEL, tokenizer)


def test_generated_calls_are_read_back():
    assert LLAMA_JSON.parse(' {"name": "add", "parameters": {"a": 1}}') == ("", (ToolCall("add", {"a": 1}),))
    assert LLAMA_JSON.parse('{"name": "add", "arguments": "{\\"a\\": 1}"}') == (
        "",
        (ToolCall("add", {"a": 1}),),
    )
    for plain in ("The answer is 5.", '{"name": 3}', '{"name": "add", "parameters": [1]}', "{broken"):
        assert LLAMA_JSON.parse(plain) == (plain, ())
    listed = '[{"name": "add", "arguments": {"a": 1}, "id": "abcdefghi"}]'
    expected = ("", (ToolCall("add", {"a": 1}, id="abcdefghi"),))
    assert MISTRAL_TOOLS.parse("[TOOL_CALLS] " + listed) == expected
    assert MISTRAL_TOOLS.parse(" " + listed) == expected  # [TOOL_CALLS] skipped as a special token
    for plain in ("Rain.", "[1, 2]", '[{"name": "add"}, 5]', "[TOOL_CALLS] nothing"):
        assert MISTRAL_TOOLS.parse(plain) == (plain, ())
    calls = (ToolCall("add", {"a": 1, "b": [2]}, id="abcdefghi"),)
    assert MISTRAL_TOOLS.parse(MISTRAL_TOOLS.answer("", calls))[1] == calls
    assert LLAMA_JSON.parse(LLAMA_JSON.answer("", calls))[1] == (ToolCall("add", {"a": 1, "b": [2]}),)


def test_mistral_call_ids():
    assert mistral_call_id("a1b2c3d4e", 0) == "a1b2c3d4e"
    assert mistral_call_id("call_0123456789abcdef", 0) == "789abcdef"
    assert mistral_call_id("c1", 0) == "c10000000"
    assert mistral_call_id(None, 12) == "000000012"


@pytest.mark.parametrize("name", ["llama3.1", "mistral-v0.3"])
def test_the_official_templates_are_recognised(tokenizer, name):
    """A tokenizer shipping the official template maps to the named one (its tool format too)."""
    tok = official(tokenizer, name)
    assert named_equivalent(tok) is get_template(name)
    assert get_template("tokenizer").tool_format(tok) is get_template(name).tools


def test_openai_records_train_in_the_llama_format(tokenizer):
    record = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "q",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "q", "content": "hot"},
            {"role": "assistant", "content": "Hot."},
        ],
    }
    conversation = to_example(record, "f #1", "messages").conversation()
    tok = official(tokenizer, "llama3.1")
    assert get_template("llama3.1").render(conversation, tok) == official_render(
        tok, "llama3.1", conversation
    )


def test_the_tokenizer_template_takes_tools_from_llama_31s_official_jinja(tokenizer):
    """data.template: tokenizer with Llama 3.1's own template splits into the named template's turns;
    Mistral's official one moves the tools to the last user turn, so it is refused with the fix."""
    for conversation in SINGLE:
        tok = official(tokenizer, "llama3.1")
        ours = get_template("tokenizer").segments(conversation, tok)
        assert ours == get_template("llama3.1").segments(conversation, tok)
    tok = official(tokenizer, "mistral-v0.3")
    with pytest.raises(ValueError, match="rewrites earlier turns.*use a named template"):
        get_template("tokenizer").segments(SINGLE[0], tok)


def test_served_calls_keep_mistrals_ids_and_forced_calls_start_in_each_format(tokenizer):
    """What `lmforge serve` returns for each format's generated text, and the prefill a
    tool_choice of `required` or a named function starts the answer with."""
    from lmforge.inference.server import tool_message

    message, called = tool_message(
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}, "id": "abcdefghi"}]', MISTRAL_TOOLS
    )
    assert called and message["content"] is None
    assert message["tool_calls"] == [
        {"id": "abcdefghi", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    ]
    message, called = tool_message('{"name": "add", "parameters": {"a": 1}}', LLAMA_JSON)
    assert called and message["tool_calls"][0]["id"].startswith("call_")
    assert tool_message("Rain.", LLAMA_JSON) == ({"content": "Rain."}, False)
    tok = official(tokenizer, "mistral-v0.3")
    assert MISTRAL_TOOLS.call_prefix(tok, "add").startswith("[TOOL_CALLS]")
    assert MISTRAL_TOOLS.call_prefix(tok, "add").endswith('"add"')
    assert LLAMA_JSON.call_prefix(tok, "add") == '{"name": "add"'
    assert '{"name": "'.startswith(LLAMA_JSON.call_prefix(tok))


def test_streamed_answers_hold_back_only_what_may_start_a_call():
    from lmforge.data.templates import HERMES

    def streamed(form, text):
        """What streaming sends as content token by token (here: character by character)."""
        return max((form.streamable(text[:n]) for n in range(len(text) + 1)), default=0)

    answer = "Let me check.\n<tool_call>\n{...}\n</tool_call>"
    assert all(HERMES.streamable(answer[:n]) <= len("Let me check.") for n in range(len(answer) + 1))
    assert streamed(HERMES, answer) == len("Let me check.")
    assert HERMES.streamable("Sure <tool_") == len("Sure")  # may begin a call: held
    assert HERMES.streamable("a < b") == len("a < b")
    for form, call in (
        (LLAMA_JSON, '{"name": "add", "parameters": {}}'),
        (MISTRAL_TOOLS, ' [{"name": "add"}]'),
    ):
        assert streamed(form, call) == 0
        assert streamed(form, "It rains.") == len("It rains.")
