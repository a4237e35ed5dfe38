"""lmforge's named templates render the same tokens as the chat_template each model's tokenizer ships.

The official Jinja templates are stored under `chat_templates/` (sources in SOURCES.md) and run
through transformers' own `apply_chat_template` on the tiny test tokenizer, with that model's
BOS/EOS strings. Two comparisons per conversation: the whole conversation (what training sees)
and the generation prompt (what inference sends).
"""

from __future__ import annotations

import copy

import pytest

from helpers import OFFICIAL_SPECIAL, OFFICIAL_TEMPLATES
from lmforge.data.templates import Conversation, get_template

FIXTURES, SPECIAL = OFFICIAL_TEMPLATES, OFFICIAL_SPECIAL
# Text an official template writes after the final answer's stop token. It is not part of any
# trained answer (generation stops at the stop token), so lmforge's render ends before it.
TRAILER = {"qwen2.5": "\n", "qwen2-vl": "\n"}

CONVERSATIONS = [
    Conversation(
        turns=[("hello", "<think>\nr\n</think>\n\nfine"), ("how are you?", "I am fine.")], system="Be nice."
    ),
    Conversation(turns=[("What is 2+2?", "4")]),
    Conversation(turns=[("a", "b"), ("c", "d"), ("e", "f")], system="S"),
]


def official_tokenizer(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    bos, eos = SPECIAL[name]
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def as_messages(conversation, last_answer=True, image_parts=False):
    out = [{"role": "system", "content": conversation.system}] if conversation.system else []
    for i, (user, assistant) in enumerate(conversation.turns):
        content = user
        if image_parts and "<image>" in user:
            content = [{"type": "image"}, {"type": "text", "text": user.replace("<image>", "")}]
        out.append({"role": "user", "content": content})
        if last_answer or i < len(conversation.turns) - 1:
            out.append({"role": "assistant", "content": assistant})
    return out


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(SPECIAL))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_named_template_renders_the_official_tokens(tokenizer, name, index):
    conversation = CONVERSATIONS[index]
    if name == "deepseek-r1":  # the official template also strips the final answer's reasoning
        conversation = Conversation(
            turns=[
                *conversation.turns[:-1],
                (conversation.turns[-1][0], conversation.turns[-1][1].split("</think>")[-1]),
            ],
            system=conversation.system,
        )
    if name == "mistral-2023":  # the first Mistral template has no system role (it raises)
        conversation = Conversation(turns=conversation.turns)
    tok = official_tokenizer(tokenizer, name)
    template = get_template(name)
    whole = conversation
    if name == "mistral-v0.3":  # its official template writes the system prompt only when the
        whole = Conversation(turns=conversation.turns)  # last message is a user's (tested below)
    official = tok.apply_chat_template(as_messages(whole), tokenize=False)
    ours = template.render(whole, tok) + TRAILER.get(name, "")
    assert ids(tok, ours) == ids(tok, official)
    # Training encodes segment by segment; the tokens still equal the official ones.
    segment_ids = [i for prompt, response in template.encode(whole, tok) for i in prompt + response]
    assert segment_ids + ids(tok, TRAILER.get(name, "")) == ids(tok, official)

    official_prompt = tok.apply_chat_template(
        as_messages(conversation, last_answer=False), tokenize=False, add_generation_prompt=True
    )
    asked = Conversation(
        turns=[*conversation.turns[:-1], (conversation.turns[-1][0], "")], system=conversation.system
    )
    assert ids(tok, template.generation_prompt(asked, tok)) == ids(tok, official_prompt)


def test_qwen2_vl_images_become_vision_tokens(tokenizer):
    tok = official_tokenizer(tokenizer, "qwen2-vl")
    conversation = Conversation(turns=[("<image>What is this?", "A cat.")])
    official = tok.apply_chat_template(as_messages(conversation, image_parts=True), tokenize=False)
    ours = get_template("qwen2-vl").render(conversation, tok) + "\n"
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in ours
    assert ids(tok, ours) == ids(tok, official)


def test_tokenizer_template_splits_prompt_and_answer(tokenizer):
    """`data.template: tokenizer` uses the shipped Jinja itself and still masks prompts correctly."""
    tok = official_tokenizer(tokenizer, "llama3")
    conversation = CONVERSATIONS[0]
    own = get_template("tokenizer")
    named = get_template("llama3")
    assert own.encode(conversation, tok) == named.encode(conversation, tok)
    deepseek = official_tokenizer(tokenizer, "deepseek-r1")
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        own.segments(conversation, deepseek)  # it drops past reasoning once a turn follows


def test_tokenizer_template_generation_prompt_and_template_errors(tokenizer):
    tok = official_tokenizer(tokenizer, "mistral")
    own = get_template("tokenizer")
    asked = Conversation(turns=[("hi", "")])
    assert own.generation_prompt(asked, tok) == get_template("mistral").generation_prompt(asked, tok)
    strict = official_tokenizer(tokenizer, "mistral")
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="refused this conversation: no system role"):
        own.segments(Conversation(turns=[("a", "b")], system="s"), strict)
