"""Multiple-choice scoring: a stub model with known letter logits gives the exact accuracy per
subject and category; batched scoring equals one question at a time on a real tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmforge.config.eval import MultipleChoiceTask
from lmforge.data.templates import get_template
from lmforge.evaluation import benchmarks
from lmforge.evaluation.choice import (
    evaluate_choices,
    first_letter,
    letter_candidates,
    letter_scores,
    predict_by_logits,
    tally,
)
from lmforge.inference.engine import Engine

# subject -> (questions in the scored split, how many of them the stub answers right)
PLAN = {"abstract_algebra": (4, 3), "philosophy": (4, 1), "marketing": (3, 3)}


class LetterStub(torch.nn.Module):
    """Reads the prompt back; puts its highest next-token logit on the letter `choose` says."""

    def __init__(self, tokenizer, choose: dict[str, str], context: int = 4096) -> None:
        super().__init__()
        self.tokenizer, self.choose = tokenizer, choose
        self.config = SimpleNamespace(max_position_embeddings=context, use_cache=False)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.candidates = dict(zip(benchmarks.LETTERS, letter_candidates(tokenizer), strict=True))
        self.prompts: list[str] = []

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            text = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(text)
            question = text.split("\n\n")[-1].split("\n")[0]  # the scored question's first line
            letter = self.choose[question]
            logits[row, int(mask.sum()) - 1, self.candidates[letter][-1]] = 5.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def mmlu_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmlu")
    return benchmarks.write_fixture("mmlu", root, {s: n for s, (n, _) in PLAN.items()})


def stub_choices() -> dict[str, str]:
    """Right on the first `right` questions of each subject, wrong (the next letter) on the rest."""
    choose = {}
    for subject, (n, right) in PLAN.items():
        for i, q in enumerate(benchmarks.fixture_questions("mmlu", subject, "test", n)):
            wrong = benchmarks.LETTERS[(benchmarks.LETTERS.index(q.answer) + 1) % 4]
            choose[q.question.split("\n")[0]] = q.answer if i < right else wrong
    return choose


def test_stub_letter_logits_give_the_exact_accuracy(mmlu_root, tokenizer) -> None:
    engine = Engine(LetterStub(tokenizer, stub_choices()), tokenizer, get_template("chatml"))
    task = MultipleChoiceTask(
        kind="multiple_choice", benchmark="mmlu", path=str(mmlu_root), shots=2, batch_size=3
    )
    result = evaluate_choices(engine, task)
    assert result.questions == 11
    assert result.accuracy == pytest.approx(7 / 11)
    assert {s: v["accuracy"] for s, v in result.per_subject.items()} == {
        "abstract_algebra": 0.75,
        "marketing": 1.0,
        "philosophy": 0.25,
    }
    assert {c: (v["n"], v["accuracy"]) for c, v in result.per_category.items()} == {
        "STEM": (4, 0.75),
        "humanities": (4, 0.25),
        "other": (3, 1.0),
    }
    assert result.subject_macro == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    # the 2-shot prompt, as the model saw it (BOS aside): two answered dev questions, then the question
    assert result.example_prompt.count("Answer:") == 3
    assert result.example_prompt.startswith(
        "The following are multiple choice questions (with answers) about"
    )
    assert all(p.rstrip().endswith("Answer:") for p in engine.model.prompts)


def test_shots_are_dropped_from_the_front_to_fit_the_context(mmlu_root, tokenizer) -> None:
    short = LetterStub(tokenizer, stub_choices(), context=260)
    task = MultipleChoiceTask(kind="multiple_choice", benchmark="mmlu", path=str(mmlu_root), shots=5, limit=1)
    result = evaluate_choices(Engine(short, tokenizer, get_template("chatml")), task)
    shots = result.example_prompt.count("Answer:") - 1
    assert 0 <= shots < 5
    assert len(tokenizer(result.example_prompt)["input_ids"]) <= 259
    full = evaluate_choices(
        Engine(LetterStub(tokenizer, stub_choices()), tokenizer, get_template("chatml")), task
    )
    assert full.example_prompt.count("Answer:") - 1 == 5
    assert full.example_prompt.endswith(result.example_prompt.split("\n\n", 1 + (5 - shots))[-1])


def test_cmmlu_china_specific_subjects_count_in_both_groups() -> None:
    questions = [
        benchmarks.Question("chinese_history", "q1", ("a", "b", "c", "d"), "A", "x"),
        benchmarks.Question("chinese_history", "q2", ("a", "b", "c", "d"), "B", "x"),
        benchmarks.Question("genetics", "q3", ("a", "b", "c", "d"), "C", "x"),
    ]
    result = tally("cmmlu", questions, ["A", "C", "C"])
    assert result.per_category["China specific"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result.per_category["Humanities"]["accuracy"] == 0.5
    assert result.per_category["STEM"]["accuracy"] == 1.0
    assert result.accuracy == pytest.approx(2 / 3)


def test_batched_logit_scoring_equals_one_at_a_time(base_dir, mmlu_root) -> None:
    """Right padding and reading each row at its own last token: batch size changes nothing."""
    engine = Engine.load(str(base_dir), template="chatml")
    questions = benchmarks.load_split("mmlu", mmlu_root, "test")["abstract_algebra"]
    prompts = [
        engine.tokenizer(benchmarks.build_prompt("mmlu", "abstract_algebra", [], q))["input_ids"]
        for q in questions
    ]
    prompts.append(prompts[0][:-3])  # a shorter row: padding
    batched = letter_scores(engine, prompts, batch_size=5)
    alone = torch.cat([letter_scores(engine, [p], batch_size=1) for p in prompts])
    assert batched.shape == (len(prompts), 4)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert len({tuple(row.tolist()) for row in alone}) == len(prompts)  # the prompts really differ
    assert predict_by_logits(engine, prompts, 5) == [benchmarks.LETTERS[i] for i in alone.argmax(1).tolist()]


def test_ceval_test_split_without_answers_is_refused(tmp_path, tokenizer) -> None:
    root = benchmarks.write_fixture("ceval", tmp_path, {"logic": 2})
    engine = Engine(LetterStub(tokenizer, {}), tokenizer, get_template("chatml"))
    task = MultipleChoiceTask(
        kind="multiple_choice", benchmark="ceval", path=str(root), split="test", shots=0
    )
    with pytest.raises(ValueError, match="use split: val"):
        evaluate_choices(engine, task)


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        (" (C) because", "C"),
        ("答案是D。", "D"),
        ("A. 42", "A"),
        ("B\nbecause the sum is even", "B"),
        ("A good way to see it: the answer is C", "C"),  # the article is not option A
        ("A good guess would be D", "D"),
        ("**Answer:** (b)", "B"),
        ("Both are wrong", ""),
        ("", ""),
    ],
)
def test_first_letter(text: str, letter: str) -> None:
    assert first_letter(text) == letter
