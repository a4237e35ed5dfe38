"""Training tokens == the whole conversation's tokens, on every tokenizer family.

Encoding prompt and answer apart gave SentencePiece tokenizers (Llama-2, Mistral, T5) a spurious
`▁` before every answer; these tests compare each template's training ids with the tokenizer's
own encoding of the whole rendered text (and, for `data.template: tokenizer`, with
`apply_chat_template(tokenize=True)`), never with hard-coded ids.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import corpus
from lmforge.data.templates import TEMPLATES, Conversation, get_template, split_encoding
from lmforge.data.tokenize import IGNORE, encode_conversation
from tokenizer_families import FAMILIES, build_family

FIXTURES = Path(__file__).parent / "chat_templates"
# DeepSeek-R1's template opens <think> only in the generation prompt, so `tokenizer` refuses it (tested
# in test_official_templates); the others split cleanly.
OFFICIAL = ["llama2", "llama3", "mistral", "qwen2.5"]
NAMES = sorted({t.name for t in TEMPLATES.values()})
CONVERSATIONS = [
    Conversation(turns=[("What is the capital?", "Paris")]),
    Conversation(
        turns=[("hello", "<think>\nr\n</think>\n\nfine"), ("how are you?", "I am fine.")], system="Be nice."
    ),
    Conversation(turns=[("a", " b"), ("c ", "d\n"), ("  e", "f  ")], system="S"),
    Conversation(turns=[("<image>What is this?", "A red cat.")]),
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_family(request.param, corpus())


def messages(conversation):
    out = [{"role": "system", "content": conversation.system}] if conversation.system else []
    for user, assistant in conversation.turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def whole_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_training_ids_equal_whole_encoding(family, name, index):
    template, conversation = get_template(name), CONVERSATIONS[index]
    encoded, truncated = encode_conversation(conversation, template, family, 10**6)
    assert not truncated
    assert encoded["input_ids"] == whole_ids(family, template.render(conversation, family))
    # Labels are exactly the tokens whose first character lies in an answer (with its stop token).
    full = template.render(conversation, family)
    spans, position = [], 0
    for prompt, response in template.segments(conversation, family):
        position += len(prompt)
        spans.append((position, position + len(response)))
        position += len(response)
    offsets = family(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = [
        token if any(a <= start < b for a, b in spans) else IGNORE
        for token, (start, _) in zip(encoded["input_ids"], offsets, strict=True)
    ]
    assert encoded["labels"] == expected
    stop = whole_ids(family, template.stop_token(family))
    assert encoded["labels"][-len(stop) :] == stop  # the answer's stop token is learned


@pytest.mark.parametrize("name", NAMES)
def test_answer_has_no_spurious_leading_token(family, name):
    """The first learned token of an answer starting mid-line is the whole text's, not a fresh `▁`."""
    template = get_template(name)
    conversation = CONVERSATIONS[0]
    prompt_ids, response_ids = template.encode(conversation, family)[-1]
    full = whole_ids(family, template.render(conversation, family))
    assert full[len(full) - len(response_ids) :] == response_ids
    assert full[: len(full) - len(response_ids)][-len(prompt_ids) :] == prompt_ids


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_ids_are_the_training_prefix(family, name):
    """What inference sends (the generation prompt, encoded alone) is what training saw before the
    answer, wherever the tokenizer does not merge across that boundary."""
    template = get_template(name)
    conversation = CONVERSATIONS[1]
    asked = Conversation(turns=[*conversation.turns[:-1], (conversation.turns[-1][0], "")], system="Be nice.")
    prompt = template.generation_prompt(asked, family)
    segments = template.encode(conversation, family)
    training_prefix = [i for p, r in segments[:-1] for i in p + r] + segments[-1][0]
    prompt_ids = whole_ids(family, prompt[: len(prompt) - len(template.generation_suffix)])
    assert prompt_ids == training_prefix


@pytest.mark.parametrize("official", OFFICIAL)
def test_tokenizer_template_equals_apply_chat_template(family, official):
    tok = copy.deepcopy(family)
    tok.chat_template = (FIXTURES / f"{official}.jinja").read_text(encoding="utf-8")
    conversation = CONVERSATIONS[1]
    own = get_template("tokenizer")
    encoded, _ = encode_conversation(conversation, own, tok, 10**6)
    reference = tok.apply_chat_template(messages(conversation), tokenize=True, return_dict=False)
    if isinstance(reference, dict):
        reference = reference["input_ids"]
    assert encoded["input_ids"] == list(reference)


def test_llama2_trims_message_whitespace(tokenizer):
    template = get_template("llama2")
    text = template.render(Conversation(turns=[("  Hello there \n", " Hi! \n")], system=" S "), tokenizer)
    # The official template strips the first user turn after the system block is folded into it.
    assert text == "<s>[INST] <<SYS>>\n S \n<</SYS>>\n\n  Hello there [/INST] Hi! </s>"
    alone = template.render(Conversation(turns=[("  Hello there \n", " Hi! \n")]), tokenizer)
    assert alone == "<s>[INST] Hello there [/INST] Hi! </s>"
    official = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": " S "},
            {"role": "user", "content": "  Hello there \n"},
            {"role": "assistant", "content": " Hi! \n"},
        ],
        chat_template=(FIXTURES / "llama2.jinja").read_text(encoding="utf-8"),
        tokenize=False,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert text == official


class NoOffsets:
    """A tokenizer that cannot give character offsets, as a slow (Python) tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_a_tokenizer_without_offsets_is_split_by_prefix_agreement(family, name):
    template = get_template(name)
    segments = template.segments(CONVERSATIONS[1], family)
    slow = split_encoding(segments, NoOffsets(family))
    assert [i for p, r in slow for i in p + r] == whole_ids(family, template.render(CONVERSATIONS[1], family))
    assert slow == split_encoding(segments, family)
