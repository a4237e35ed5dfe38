"""The quickstart's synthetic task: held-out items never reach training, answers check exactly."""

from __future__ import annotations

import re

import pytest

from lmforge.data.synthetic import (
    QUICKSTART_SIZES,
    TaskExample,
    is_correct,
    is_heldout_item,
    make_task_split,
    pretrain_corpus,
    solve,
    to_alpaca_records,
    tokenizer_corpus,
)


def digits_of(example: TaskExample) -> str:
    return example.prompt.rsplit(" ", 1)[-1]


def test_answers_are_the_sorted_digits():
    train, heldout = make_task_split(0, 50, 20)
    for ex in train + heldout:
        digits = digits_of(ex)
        assert digits.isdigit() and 3 <= len(digits) <= 6 and len(set(digits)) == len(digits)
        assert ex.answer == "".join(sorted(digits)) == solve(digits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_heldout_are_disjoint(seed):
    train, heldout = make_task_split(seed, 500, 200)
    assert len({ex.prompt for ex in train}) == 500
    assert len({ex.prompt for ex in heldout}) == 200
    # Disjoint by digit set, so not even a permutation of a held-out prompt, nor its answer,
    # is trained on.
    assert not {ex.answer for ex in train} & {ex.answer for ex in heldout}
    assert all(is_heldout_item(digits_of(ex)) for ex in heldout)
    assert not any(is_heldout_item(digits_of(ex)) for ex in train)


def test_split_is_the_same_for_every_seed():
    # Held-out items of one seed are never training items of another.
    heldout_sets = {ex.answer for seed in (0, 1, 2) for ex in make_task_split(seed, 0, 100)[1]}
    train_sets = {ex.answer for seed in (0, 1, 2) for ex in make_task_split(seed, 300, 0)[0]}
    assert not heldout_sets & train_sets


def test_pretrain_corpus_never_contains_heldout_items():
    _, heldout = make_task_split(0, 0, 200)
    exclude = {ex.prompt for ex in heldout} | {ex.answer for ex in heldout}
    corpus = pretrain_corpus(0, 3000, exclude)
    assert len(corpus) == 3000
    runs = {run for line in corpus for run in re.findall(r"\d+", line)}
    heldout_digits = {digits_of(ex) for ex in heldout} | {ex.answer for ex in heldout}
    assert not runs & heldout_digits
    assert not any(is_heldout_item(run) for run in runs)
    task_lines = [line for line in corpus if line.startswith("sort ")]
    assert 0.6 * len(corpus) < len(task_lines) < len(corpus)  # the skill, plus filler text
    for line in task_lines:
        digits, answer = re.fullmatch(r"sort (\d+) -> (\d+)", line).groups()  # type: ignore[union-attr]
        assert answer == solve(digits)


def test_pretrain_corpus_honours_exclude_for_training_items():
    train, _ = make_task_split(0, 30, 0)
    corpus = pretrain_corpus(0, 3000, {ex.answer for ex in train})
    runs = {run for line in corpus for run in re.findall(r"\d+", line)}
    assert not runs & {ex.answer for ex in train}


def test_pretrain_corpus_does_not_use_the_chat_form():
    text = "\n".join(pretrain_corpus(0, 500, set()))
    assert "Sort the digits" not in text and "<|im_" not in text


def test_is_correct_is_exact_match_after_strip():
    ex = TaskExample(prompt="Sort the digits: 5183", answer="1358")
    assert is_correct("1358", ex)
    assert is_correct("  1358\n", ex)
    assert not is_correct("1 3 5 8", ex)
    assert not is_correct("13580", ex)
    assert not is_correct("1358.", ex)
    assert not is_correct("", ex)


def test_deterministic_by_seed():
    assert make_task_split(3, 40, 10) == make_task_split(3, 40, 10)
    assert make_task_split(3, 40, 10) != make_task_split(4, 40, 10)
    assert pretrain_corpus(3, 200, set()) == pretrain_corpus(3, 200, set())
    assert pretrain_corpus(3, 200, set()) != pretrain_corpus(4, 200, set())
    assert tokenizer_corpus() == tokenizer_corpus()


def test_too_many_items_is_an_error():
    with pytest.raises(ValueError, match="held-out"):
        make_task_split(0, 0, 10**6)


def test_alpaca_records():
    train, _ = make_task_split(0, 3, 0)
    records = to_alpaca_records(train)
    assert records == [{"instruction": ex.prompt, "input": "", "output": ex.answer} for ex in train]


def test_tokenizer_corpus_covers_the_task():
    text = "".join(tokenizer_corpus())
    _, heldout = make_task_split(0, 0, 20)
    used = "".join(pretrain_corpus(0, 300, set())) + "".join(ex.prompt for ex in heldout)
    assert set(used) <= set(text)


def test_sizes_fit_the_answers():
    sizes = QUICKSTART_SIZES
    assert sizes["n_train"] > 0 and sizes["n_heldout"] > 0
    assert sizes["max_new_tokens"] > 6  # longest answer (6 digit tokens) plus the stop token
    assert sizes["lora_r"] > 0 and sizes["pretrain_steps"] > 0 and sizes["sft_steps"] > 0
