"""Perplexity equals exp(mean token NLL) computed by hand; sliding windows score each token once."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config.model import ModelConfig
from lmforge.data.formats import Example
from lmforge.data.templates import get_template
from lmforge.data.tokenize import IGNORE
from lmforge.evaluation.perplexity import encode_for_perplexity, perplexity, windows
from lmforge.models.loading import load_causal_lm

TEXTS = [
    "the cat sat on a mat and the dog ran to the hat",
    "add 3 and 4 is 7",
    "red blue green the cat sat on a mat red blue green the dog ran",
]


@pytest.fixture(scope="module")
def model(base_dir):
    loaded, _ = load_causal_lm(ModelConfig(name_or_path=str(base_dir)), for_training=False, quiet=True)
    return loaded.eval()


def nll_by_hand(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum and count of -log p(token | all tokens before it) in one full-length forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    total, count = 0.0, 0
    for position in range(1, len(ids)):
        if labels[position] == IGNORE:
            continue
        total -= float(F.log_softmax(logits[position - 1].float(), dim=-1)[ids[position]])
        count += 1
    return total, count


def test_text_perplexity_is_exp_mean_nll(model, tokenizer) -> None:
    template = get_template("chatml")
    examples = [Example(text=t) for t in TEXTS]
    total, count = 0.0, 0
    for example in examples:
        ids, labels = encode_for_perplexity(example, tokenizer, template)
        part, n = nll_by_hand(model, ids, labels)
        total, count = total + part, count + n
    result = perplexity(model, tokenizer, template, examples, window=256, batch_size=2)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.windows == len(examples)  # each text fits one window


def test_chat_perplexity_scores_only_the_answers(model, tokenizer) -> None:
    template = get_template("chatml")
    example = Example(turns=(("what is add 3 and 4", "7"), ("and add 2 and 2", "is 4")))
    ids, labels = encode_for_perplexity(example, tokenizer, template)
    answers = [ids_ for _, ids_ in template.encode(example.conversation(), tokenizer)]
    assert [t for t in labels if t != IGNORE] == answers[0] + answers[1]  # both assistant turns, nothing else
    total, count = nll_by_hand(model, ids, labels)
    result = perplexity(model, tokenizer, template, [example], window=512)
    assert result.tokens == count == len(answers[0]) + len(answers[1])
    assert result.nll == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(10, 4, 2), (10, 4, 4), (9, 3, 1), (5, 8, 4), (12, 5, 3)]
)
def test_windows_score_every_token_once(length: int, window: int, stride: int) -> None:
    ids = list(range(100, 100 + length))
    chunks = windows(ids, list(ids), window, stride)
    scored = []
    for chunk_ids, chunk_labels in chunks:
        assert len(chunk_ids) <= window
        begin = ids.index(chunk_ids[0])
        assert chunk_labels[0] == IGNORE  # a window's first token has no context inside it
        scored += [begin + i for i, label in enumerate(chunk_labels) if label != IGNORE]
    assert scored == list(range(1, length))  # every position after the first, exactly once, in order


def test_sliding_windows_match_hand_computed_windows(model, tokenizer) -> None:
    """A text longer than the window: each token's NLL given only the window's earlier tokens."""
    template = get_template("chatml")
    example = Example(text=" ".join(TEXTS))
    ids, labels = encode_for_perplexity(example, tokenizer, template)
    window, stride = 12, 5
    assert len(ids) > 2 * window
    total, count = 0.0, 0
    for chunk_ids, chunk_labels in windows(ids, labels, window, stride):
        part, n = nll_by_hand(model, chunk_ids, chunk_labels)
        total, count = total + part, count + n
    result = perplexity(model, tokenizer, template, [example], window=window, stride=stride, batch_size=3)
    assert count == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    full = perplexity(model, tokenizer, template, [example], window=len(ids))
    assert full.tokens == result.tokens and full.perplexity != pytest.approx(result.perplexity, rel=1e-6)


def test_perplexity_refuses_prompt_only_records(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="needs text or an answer"):
        perplexity(
            model, tokenizer, get_template("chatml"), [Example(turns=(("hi", ""),), where="f.json: record 3")]
        )


def test_a_chat_record_longer_than_the_window_scores_every_answer_token(model, tokenizer) -> None:
    template = get_template("chatml")
    example = Example(turns=(("add 3 and 4", "the sum of 3 and 4 is 7 and the cat sat on a mat"),))
    ids, labels = encode_for_perplexity(example, tokenizer, template)
    window = 10
    assert len(ids) > 2 * window
    total, count = 0.0, 0
    for chunk_ids, chunk_labels in windows(ids, labels, window, 4):
        part, n = nll_by_hand(model, chunk_ids, chunk_labels)
        total, count = total + part, count + n
    result = perplexity(model, tokenizer, template, [example], window=window, stride=4)
    assert count == result.tokens == sum(label != IGNORE for label in labels)
    assert result.nll == pytest.approx(total / count, rel=1e-5)


def test_without_a_bos_token_the_first_token_is_not_scored(model, tokenizer) -> None:
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    ids, _ = encode_for_perplexity(Example(text="the cat sat"), no_bos, get_template("chatml"))
    result = perplexity(model, no_bos, get_template("chatml"), [Example(text="the cat sat")], window=64)
    assert result.tokens == len(ids) - 1


def test_image_records_are_refused(model, tokenizer) -> None:
    example = Example(
        turns=(("<image>what colour?", "red"),), images=(Path("a.png"),), where="vqa.json: record 2"
    )
    with pytest.raises(ValueError, match="record 2: has images"):
        perplexity(model, tokenizer, get_template("chatml"), [example])
