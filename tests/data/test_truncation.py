"""What `data.max_length` does to an example whose answer does not fit (as README and docs/data.md say).

Text SFT: the example is cut at max_length. An answer cut partway is kept, its first tokens learned
and its stop token lost; the example is dropped only when no answer token is left to learn. An
example with images is dropped when anything is cut. Image-text SFT keeps a cut answer the same
way and refuses an example whose image tokens would be cut.
"""

from __future__ import annotations

import pytest

from lmforge.config.model import ModelConfig
from lmforge.data.files import DataError
from lmforge.data.formats import Example
from lmforge.data.multimodal import VisionProcessor, encode_multimodal
from lmforge.data.templates import Conversation, get_template
from lmforge.data.tokenize import IGNORE, tokenize_examples
from lmforge.models.loading import load_tokenizer

TEMPLATE = get_template("chatml")
LONG_ANSWER = "the cat sat on the mat " * 10


def learned(row: list[int], labels: list[int]) -> list[int]:
    return [token for token, label in zip(row, labels, strict=True) if label != IGNORE]


def test_an_answer_cut_partway_is_kept_and_its_first_tokens_learned(tokenizer):
    conversation = Conversation(turns=[("add 1 and 2", LONG_ANSWER)])
    [(prompt, answer)] = TEMPLATE.encode(conversation, tokenizer)
    max_length = len(prompt) + 5
    example = Example(turns=tuple(conversation.turns), where="long")
    dataset, stats = tokenize_examples([example], TEMPLATE, tokenizer, max_length)
    assert (stats.truncated, stats.dropped, len(dataset)) == (1, 0, 1)
    ids, labels = dataset["input_ids"][0], dataset["labels"][0]
    assert ids == prompt + answer[:5]
    assert learned(ids, labels) == answer[:5]  # the cut answer's first 5 tokens are trained on
    stop = tokenizer.convert_tokens_to_ids(TEMPLATE.stop_token(tokenizer))
    assert answer[-1] == stop and stop not in learned(ids, labels)  # ... and its stop token is gone


def test_an_example_is_dropped_only_when_no_answer_token_is_left(tokenizer):
    conversation = Conversation(turns=[("add 1 and 2", "3"), ("and " * 40, LONG_ANSWER)])
    (prompt1, answer1), (prompt2, _) = TEMPLATE.encode(conversation, tokenizer)
    max_length = len(prompt1) + len(answer1) + 3  # the cut falls inside the second prompt
    example = Example(turns=tuple(conversation.turns), where="two turns")
    # Every turn learned: the first answer is whole, so the example is kept without the last one.
    every, stats = tokenize_examples([example], TEMPLATE, tokenizer, max_length)
    assert (stats.truncated, stats.dropped, len(every)) == (1, 0, 1)
    assert learned(every["input_ids"][0], every["labels"][0]) == answer1
    assert every["input_ids"][0] == prompt1 + answer1 + prompt2[:3]
    # Only the last turn learned: nothing is left to learn, so it is dropped and counted.
    last, stats = tokenize_examples([example], TEMPLATE, tokenizer, max_length, train_on="last_turn")
    assert (stats.truncated, stats.dropped, len(last)) == (1, 1, 0)
    assert stats.dropped_where == ["two turns"]


def test_an_example_with_images_is_dropped_when_its_answer_is_cut(tokenizer, tmp_path):
    template = get_template("qwen2-vl")
    example = Example(turns=(("<image> what is it", LONG_ANSWER),), images=(tmp_path / "a.png",), where="pic")
    [(prompt, _)] = template.encode(example.conversation(), tokenizer)
    dataset, stats = tokenize_examples([example], template, tokenizer, len(prompt) + 5)
    assert (stats.truncated, stats.dropped, stats.image_cut, len(dataset)) == (1, 1, 1, 0)


def test_image_text_sft_keeps_a_cut_answer_and_refuses_cut_image_tokens(vlm_dir, shapes_file):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(vlm_dir)))
    template = get_template("qwen2-vl")
    vision = VisionProcessor.load(str(vlm_dir), tokenizer, None, None)
    image = next(shapes_file.parent.glob("images/*.png"))
    example = Example(turns=(("<image>What colour?", LONG_ANSWER),), images=(image,), where="pic")
    whole = encode_multimodal(example, template, tokenizer, vision, 10**6)
    answer = learned(whole["input_ids"], whole["labels"])
    max_length = len(whole["input_ids"]) - len(answer) + 5
    cut = encode_multimodal(example, template, tokenizer, vision, max_length)
    assert cut["input_ids"] == whole["input_ids"][:max_length]
    assert learned(cut["input_ids"], cut["labels"]) == answer[:5]
    last_image = max(i for i, t in enumerate(whole["input_ids"]) if t == vision.image_token_id)
    with pytest.raises(DataError, match=f"pic: .*past data.max_length={last_image}"):
        encode_multimodal(example, template, tokenizer, vision, last_image)
