"""Chat templates: the exact published formats, and segment encoding == whole-text encoding."""

from __future__ import annotations

import pytest

from lmforge.data.templates import TEMPLATES, Conversation, get_template

CONVERSATION = Conversation(
    turns=[("hello", "<think>\nr\n</think>\n\nfine"), ("how are you?", "I am fine.")], system="Be nice."
)

# The formats as published with each model's tokenizer (chat_template), written out for this conversation.
EXPECTED = {
    "llama2": "<s>[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nhello [/INST] <think>\nr\n</think>\n\nfine </s>"
    "<s>[INST] how are you? [/INST] I am fine. </s>",
    "mistral": "<s> [INST] Be nice.\n\nhello [/INST] <think>\nr\n</think>\n\nfine</s>"
    " [INST] how are you? [/INST] I am fine.</s>",
    "chatml": "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nr\n</think>\n\nfine<|im_end|>\n"
    "<|im_start|>user\nhow are you?<|im_end|>\n"
    "<|im_start|>assistant\nI am fine.<|im_end|>",
    "deepseek-r1": "<｜begin▁of▁sentence｜>Be nice.<｜User｜>hello"
    "<｜Assistant｜>\n\nfine<｜end▁of▁sentence｜>"
    "<｜User｜>how are you?<｜Assistant｜>I am fine.<｜end▁of▁sentence｜>",
    "alpaca": "<s>Be nice.\n\n### Instruction:\nhello\n\n### Response:\n<think>\nr\n</think>\n\nfine</s>\n\n"
    "### Instruction:\nhow are you?\n\n### Response:\nI am fine.</s>",
    "plain": "<s>Be nice.\nhello\n<think>\nr\n</think>\n\nfine</s>\nhow are you?\nI am fine.</s>",
}
NAMES = sorted({t.name for t in TEMPLATES.values()})


def messages(conversation: Conversation) -> list[dict]:
    out = [{"role": "system", "content": conversation.system}] if conversation.system else []
    for user, assistant in conversation.turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_render_matches_published_format(tokenizer, name):
    assert get_template(name).render(CONVERSATION, tokenizer) == EXPECTED[name]


def test_qwen_default_system(tokenizer):
    text = get_template("qwen2.5").render(Conversation(turns=[("hi", "yo")]), tokenizer)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


@pytest.mark.parametrize("name", NAMES)
def test_segments_encode_token_for_token(tokenizer, name):
    template = get_template(name)
    segment_ids = [
        i for prompt, response in template.encode(CONVERSATION, tokenizer) for i in prompt + response
    ]
    whole_ids = tokenizer(template.render(CONVERSATION, tokenizer), add_special_tokens=False)["input_ids"]
    assert segment_ids == whole_ids


@pytest.mark.parametrize("name", NAMES)
def test_saved_jinja_template_agrees(tokenizer, name):
    template = get_template(name)
    jinja_text = tokenizer.apply_chat_template(
        messages(CONVERSATION), chat_template=template.jinja(), tokenize=False
    )
    assert jinja_text == template.render(CONVERSATION, tokenizer)
    no_system = Conversation(turns=[("hi", "yo")])
    assert tokenizer.apply_chat_template(
        messages(no_system), chat_template=template.jinja(), tokenize=False
    ) == template.render(no_system, tokenizer)


@pytest.mark.parametrize("name", NAMES)
def test_generation_prompt_is_prefix_of_render(tokenizer, name):
    template = get_template(name)
    prompt = template.generation_prompt(
        Conversation(turns=[*CONVERSATION.turns[:1], ("how are you?", "")], system="Be nice."), tokenizer
    )
    assert prompt.endswith(template.generation_suffix)
    prompt = prompt[: len(prompt) - len(template.generation_suffix)]
    assert template.render(CONVERSATION, tokenizer).startswith(prompt)
    assert (
        template.render(CONVERSATION, tokenizer)[len(prompt) :]
        == template.segments(CONVERSATION, tokenizer)[-1][1]
    )


def test_unknown_template_lists_known():
    with pytest.raises(ValueError, match="known templates: .*chatml"):
        get_template("chatmI")


def test_user_braces_are_not_format_fields(tokenizer):
    text = get_template("chatml").render(Conversation(turns=[("{content} {eos}", "ok")]), tokenizer)
    assert "{content} {eos}" in text


@pytest.mark.parametrize(
    ("model", "template"),
    [
        ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1"),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-r1"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-v0.3"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5"),
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl"),
        ("/models/my-own-model", None),
    ],
)
def test_the_family_template_is_guessed_from_the_model_name(model, template):
    from lmforge.data.templates import guess_template

    assert guess_template(model) == template
