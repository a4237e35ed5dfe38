"""Final-answer extraction and matching on tricky completions."""

from __future__ import annotations

import pytest

from lmforge.evaluation.answers import extract_answer, matches, normalize, think_then_answer


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The answer is 42.", "42"),
        ("The answer is 42 apples. Done.", "42"),
        ("The answer is Paris. It is big.", "Paris."),
        ("<think>maybe 7, or 8</think>The answer is 9", "9"),
        ("<think>the answer is 3</think>\n\n\\boxed{12}", "12"),  # the trace's answer is not the answer
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, braces balanced
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K's marker
        ("So 3 + 4 = 7, and 7 * 2 = 14 apples", "14"),  # the last number
        ("It costs $1,250.50 in total", "1,250.50"),
        ("Answer: Paris", "Paris"),
        ("answer is -3; check: -3 + 3 = 0. So the answer is -3", "-3"),  # the last "answer is"
        ("The answer is:\n\n42", "42"),  # past the colon and blank lines
        ("**Answer:**\n42", "42"),  # markdown bold
        ("So the answer is:", "So the answer is:"),  # nothing after it, no number: the text
        ("#### Step 2\nadd 3 to get 10", "10"),  # a markdown heading is not GSM8K's mark
        ("no digits here", "no digits here"),
        ("<think>unfinished", "<think>unfinished"),  # no </think>: all of it is the answer text
    ],
)
def test_extract_answer(completion: str, answer: str) -> None:
    assert extract_answer(completion) == answer


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("The answer is 42.", "42", True),
        ("#### 1,000", "1000", True),  # thousands separators
        ("\\boxed{5.0}", "5", True),  # 5.0 reads as 5
        ("\\boxed{$12$}", "12", True),
        ("The answer is 0123", "123", False),  # leading zeros are kept
        ("The answer is 41", "Step by step: 6 * 7 = 42\n#### 42", False),
        ("The answer is 42", "Step by step: 6 * 7 = 42\n#### 42", True),  # reference extracted too
        ("<think>42</think>I do not know", "42", False),
    ],
)
def test_matches(completion: str, reference: str, expected: bool) -> None:
    assert matches(completion, reference) is expected


def test_normalize() -> None:
    assert normalize(" $3.50. ") == "3.5"
    assert normalize("1,234") == "1234"
    assert normalize("Paris.") == "Paris"


@pytest.mark.parametrize(
    ("completion", "compliant"),
    [
        ("<think>add them</think>5", True),
        ("<think>  </think>5", False),  # empty trace
        ("<think>add them</think>", False),  # no answer
        ("5 <think>late</think> 6", False),  # the trace must come first
    ],
)
def test_think_then_answer(completion: str, compliant: bool) -> None:
    assert think_then_answer(completion) is compliant
