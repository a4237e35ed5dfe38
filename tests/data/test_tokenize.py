"""Label masking: only response tokens (and their stop token) are learned, for every template."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lmforge.data.formats import Example
from lmforge.data.templates import TEMPLATES, Conversation, get_template
from lmforge.data.tokenize import IGNORE, encode_conversation, tokenize_examples

NAMES = sorted({t.name for t in TEMPLATES.values()})


def example(turns, where="r"):
    return Example(turns=tuple(turns), where=where)


CONV = Conversation(turns=[("add 1 and 2", "3"), ("add 4 and 5", "9")], system="math")


@pytest.mark.parametrize("name", NAMES)
def test_only_responses_carry_labels(tokenizer, name):
    template = get_template(name)
    encoded, truncated = encode_conversation(CONV, template, tokenizer, max_length=512)
    assert not truncated
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    # Labelled positions are exactly the response segments, in order.
    expected = [t for _, response in template.encode(CONV, tokenizer) for t in response]
    assert [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE] == expected
    assert [lab for lab in labels if lab != IGNORE] == expected
    # Each response ends with the stop token, and it is labelled.
    stop_id = tokenizer.convert_tokens_to_ids(template.stop_token(tokenizer))
    labelled = [lab for lab in labels if lab != IGNORE]
    assert labelled.count(stop_id) == 2
    assert labelled[-1] == stop_id
    # Every prompt token is masked.
    prompt_tokens = sum(len(p) for p, _ in template.encode(CONV, tokenizer))
    assert labels.count(IGNORE) == prompt_tokens


def test_truncation_respects_max_length_and_is_counted(tokenizer):
    template = get_template("chatml")
    fits = len(encode_conversation(CONV, template, tokenizer, 512)[0]["input_ids"])
    long = example([("add 1 and 2", "the cat sat on the mat " * 20)], "long")
    dataset, stats = tokenize_examples(
        [long, Example(turns=tuple(CONV.turns), system=CONV.system)], template, tokenizer, max_length=fits
    )
    assert stats.truncated == 1 and stats.examples == 2 and stats.truncated_where == ["long"]
    assert [len(ids) for ids in dataset["input_ids"]] == [fits, fits]


def test_prompt_filling_max_length_is_dropped(tokenizer):
    template = get_template("chatml")
    fits = len(encode_conversation(CONV, template, tokenizer, 512)[0]["input_ids"])
    long = example([("the cat sat on the mat " * 20, "3")], "long")
    dataset, stats = tokenize_examples(
        [long, Example(turns=tuple(CONV.turns), system=CONV.system)], template, tokenizer, max_length=fits
    )
    assert stats.dropped == 1 and len(dataset) == 1 and stats.dropped_where == ["long"]


def test_truncation_that_would_cut_an_image_drops_the_example(tokenizer, tmp_path):
    template = get_template("qwen2-vl")
    pic = example([("<image> what is this", "the cat sat on the mat " * 20)], "pic")
    pic = Example(turns=pic.turns, images=(tmp_path / "a.png",), where="pic")
    dataset, stats = tokenize_examples([pic], template, tokenizer, max_length=40)
    assert len(dataset) == 0 and stats.image_cut == 1 and stats.dropped_where == ["pic"]


def test_train_on_last_turn_masks_earlier_answers(tokenizer):
    template = get_template("chatml")
    every, _ = encode_conversation(CONV, template, tokenizer, 512)
    last, _ = encode_conversation(CONV, template, tokenizer, 512, train_on="last_turn")
    assert every["input_ids"] == last["input_ids"]
    (_, first_answer), (_, second_answer) = template.encode(CONV, tokenizer)
    assert [t for t in last["labels"] if t != IGNORE] == second_answer
    assert [t for t in every["labels"] if t != IGNORE] == first_answer + second_answer


def test_collator_keeps_eos_label_when_pad_equals_eos(tokenizer):
    template = get_template("plain")
    encoded, _ = encode_conversation(Conversation(turns=[("a", "b")]), template, tokenizer, 64)
    longer, _ = encode_conversation(CONV, template, tokenizer, 64)
    eos = tokenizer.eos_token_id
    batch = DataCollatorForLanguageModeling(pad_token_id=eos)([encoded, longer])  # the one SFTTrainer builds
    n = len(encoded["input_ids"])
    assert batch["labels"][0, n - 1].item() == eos  # the real EOS is learned
    assert (batch["labels"][0, n:] == IGNORE).all()  # padding (also id eos) is not
    assert (batch["attention_mask"][0, n:] == 0).all()
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(longer["input_ids"]))
    assert torch.equal(batch["input_ids"][0, n:], torch.full_like(batch["input_ids"][0, n:], eos))
