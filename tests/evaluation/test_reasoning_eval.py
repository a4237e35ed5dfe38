"""Reasoning metrics on hand-made answers: accuracy, <think> compliance, lengths, failures."""

from __future__ import annotations

import json

import pytest

from lmforge.evaluation.reasoning import evaluate_reasoning, length_stats, score_reasoning
from lmforge.inference.engine import Engine, Generation, SamplingParams
from lmforge.inference.predict import read_examples


@pytest.fixture
def gsm8k_file(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
        {"question": "Half of 1,000?", "answer": "1000 / 2 = 500\n#### 500"},
        {"question": "What is 10 - 3?", "answer": "#### 7"},
    ]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_records_read_as_questions_with_reference_answers(gsm8k_file) -> None:
    examples = read_examples(str(gsm8k_file))
    assert [e.kind for e in examples] == ["prompt"] * 4
    assert examples[1].prompt == "What is 6 times 7?"
    assert examples[1].reference == {"answer": "6 * 7 = 42\n#### 42"}


def test_score_reasoning_on_known_answers(gsm8k_file) -> None:
    examples = read_examples(str(gsm8k_file))
    outputs = [
        Generation("<think>3 plus 4 is 7</think>The answer is 7.", 10, 12, "stop"),  # right, compliant
        Generation("<think>6 * 7 = 48</think>\\boxed{48}", 10, 9, "stop"),  # wrong, compliant
        Generation("It is 500", 10, 3, "stop"),  # right, no trace
        Generation("<think>10 minus 3 is", 10, 20, "length"),  # cut off while thinking: wrong
    ]
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer count
    metrics = score_reasoning(examples, outputs, opened=False, count_tokens=words, failures=1)
    assert metrics["accuracy"] == 0.5
    assert metrics["think_compliance"] == 0.5
    assert metrics["with_reasoning"] == 0.75
    assert metrics["accuracy_with_reasoning"] == pytest.approx(1 / 3)
    assert metrics["cut_off"] == 0.25
    assert metrics["completion_tokens"] == {"n": 4, "mean": 11.0, "median": 10.5, "p90": 20, "max": 20}
    assert metrics["reasoning_tokens"]["n"] == 3 and metrics["reasoning_tokens"]["max"] == 5
    assert len(metrics["failures"]) == 1
    failure = metrics["failures"][0]
    assert (failure["extracted"], failure["reference"]) == ("48", "42")


def test_a_cut_off_trace_has_no_answer_even_with_the_right_number_in_it(gsm8k_file) -> None:
    examples = read_examples(str(gsm8k_file))[:2]
    outputs = [
        Generation("<think>so 3 + 4 = 7, but wait", 10, 9, "length"),  # 7 is in the trace only
        Generation("<think></think>42", 10, 3, "stop"),  # an empty trace (non-thinking mode)
    ]
    metrics = score_reasoning(examples, outputs, opened=False, count_tokens=lambda t: len(t.split()))
    assert [r["correct"] for r in metrics["_rows"]] == [False, True]
    assert metrics["think_compliance"] == 0.0  # neither has both a trace and an answer
    assert metrics["reasoning_tokens"] == {
        "n": 2,
        "mean": 4.0,
        "median": 4.0,
        "p90": 8,
        "max": 8,
    }  # 8 and 0 words


def test_a_trace_opened_by_the_prompt_counts_as_compliant(gsm8k_file) -> None:
    examples = read_examples(str(gsm8k_file))[:1]
    output = [Generation("3 and 4 make 7</think>\n7", 10, 8, "stop")]
    opened = score_reasoning(examples, output, opened=True, count_tokens=len)
    assert opened["think_compliance"] == 1.0 and opened["accuracy"] == 1.0


def test_missing_reference_is_an_error(tmp_path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    examples = read_examples(str(path))
    with pytest.raises(ValueError, match="line 1: no reference answer"):
        score_reasoning(examples, [Generation("4", 3, 1, "stop")], opened=False, count_tokens=len)


def test_length_stats() -> None:
    assert length_stats([]) == {"n": 0}
    assert length_stats([5, 1, 3]) == {"n": 3, "mean": 3.0, "median": 3, "p90": 5, "max": 5}


def test_evaluate_reasoning_generates_with_the_engine(base_dir, gsm8k_file) -> None:
    engine = Engine.load(str(base_dir), template="chatml")
    examples = read_examples(str(gsm8k_file))
    metrics = evaluate_reasoning(
        engine, examples, SamplingParams(max_new_tokens=4), batch_size=3, failures=10
    )
    rows = metrics["_rows"]
    assert len(rows) == 4 and metrics["items"] == 4
    assert all(r["completion_tokens"] <= 4 for r in rows)
    assert metrics["accuracy"] == sum(r["correct"] for r in rows) / 4
    assert len(metrics["failures"]) == 4 - sum(r["correct"] for r in rows)
