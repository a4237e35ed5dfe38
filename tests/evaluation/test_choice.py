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
    fitted_prompt,
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


SHORT = ["What is 2 + 3?", "add 2 and 3"]
LONG = "the cat sat on a mat " * 20 + "What is 2 + 3?"


def write_mmlu(root, questions: list[str], options: tuple[str, ...] = ("5", "6", "7", "8")):
    """An astronomy MMLU folder by hand: 5 dev questions and `questions` (all answered A) to score."""
    for split, texts in (("dev", [f"What is {i} + 1?" for i in range(5)]), ("test", questions)):
        (root / split).mkdir(parents=True)
        lines = "".join(f'"{t}",{",".join(options)},A\n' for t in texts)
        (root / split / f"astronomy_{split}.csv").write_text(lines)
    return root


@pytest.fixture(scope="module")
def short_context(tokenizer) -> Engine:
    """A real tiny Llama whose context (160 positions) holds a bare question but not 5 shots."""
    from lmforge.models.tiny import build_tiny_llama

    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_positions=160)
    return Engine(model.eval(), tokenizer, get_template("chatml"))


def test_a_question_longer_than_the_context_is_cropped_from_the_left(tmp_path, short_context) -> None:
    """Shots go first, then the long question loses its header and text from the left, keeping its
    options and cue; every prompt the model sees fits, and the crops are counted and marked."""
    root = write_mmlu(tmp_path, [*SHORT, LONG])
    task = MultipleChoiceTask(kind="multiple_choice", benchmark="mmlu", path=str(root), shots=5)
    seen: list[int] = []
    hook = short_context.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.extend(kwargs["attention_mask"].sum(1).tolist()), with_kwargs=True
    )
    try:
        result = evaluate_choices(short_context, task)
    finally:
        hook.remove()
    assert (result.questions, result.fewer_shots, result.cropped) == (3, 3, 1)
    assert [(r["dropped_shots"], r["cropped"]) for r in result.rows][2] == (5, True)
    assert not any(r["cropped"] for r in result.rows[:2])
    assert result.metrics()["cropped"] == 1 and result.metrics()["fewer_shots"] == 3
    assert len(seen) == 3 and max(seen) <= 159
    assert "lost shots and 1 were cropped" in result.fitting_note(160)


def test_the_crop_keeps_the_longest_end_that_fits(tmp_path, short_context) -> None:
    root = write_mmlu(tmp_path, [LONG])
    task = MultipleChoiceTask(kind="multiple_choice", benchmark="mmlu", path=str(root), shots=0)
    question = benchmarks.load_split("mmlu", root, "test")["astronomy"][0]
    prompt = fitted_prompt(short_context, task, "astronomy", [], question, 159)
    whole = benchmarks.build_prompt("mmlu", "astronomy", [], question)
    assert prompt.cropped and whole.endswith(prompt.text) and len(prompt.text) < len(whole)
    assert prompt.text.endswith("\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")
    assert len(prompt.ids) <= 159
    one_more = whole[len(whole) - len(prompt.text) - 1 :]
    assert len(short_context.tokenizer(one_more)["input_ids"]) > 159


def test_options_longer_than_the_context_are_refused_naming_the_row(tmp_path, short_context) -> None:
    long_options = tuple(f"the cat sat on a mat {x} " * 8 for x in "abcd")
    root = write_mmlu(tmp_path, SHORT, options=long_options)
    task = MultipleChoiceTask(kind="multiple_choice", benchmark="mmlu", path=str(root), shots=0)
    with pytest.raises(ValueError, match=r"astronomy_test\.csv:row 1: the question's options and answer cue"):
        evaluate_choices(short_context, task)


def test_generate_scoring_reports_the_share_without_a_letter(mmlu_root, tokenizer) -> None:
    engine = Engine(LetterStub(tokenizer, {}), tokenizer, get_template("chatml"))
    answers = iter(["B", "no idea", "The answer is C", "", "D. 8", "none of them"])
    engine.complete = lambda prompts, params: [SimpleNamespace(text=next(answers)) for _ in prompts]
    task = MultipleChoiceTask(
        kind="multiple_choice", benchmark="mmlu", path=str(mmlu_root), shots=0, limit=2, scoring="generate"
    )
    result = evaluate_choices(engine, task)
    assert [r["predicted"] for r in result.rows] == ["B", "", "C", "", "D", ""]
    assert result.metrics()["no_letter"] == pytest.approx(3 / 6)
    logits = MultipleChoiceTask(
        kind="multiple_choice", benchmark="mmlu", path=str(mmlu_root), shots=0, limit=1
    )
    assert (
        "no_letter"
        not in evaluate_choices(
            Engine(LetterStub(tokenizer, stub_choices()), tokenizer, get_template("chatml")), logits
        ).metrics()
    )
