"""The <think> trace apart from the answer, whole and streamed in any split."""

from __future__ import annotations

import pytest

from lmforge.inference.reasoning import ReasoningStream, prompt_opens_reasoning, split_reasoning


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\n2+3=5\n</think>\n\nThe answer is 5.", False, ("2+3=5", "The answer is 5.")),
        ("2+3=5\n</think>\n\n5", True, ("2+3=5", "5")),  # the prompt opened the block
        ("Just 5.", False, (None, "Just 5.")),
        ("<think>still going", False, ("still going", "")),  # cut off while thinking
        ("still going", True, ("still going", "")),
    ],
)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
@pytest.mark.parametrize(
    ("text", "opened"),
    [
        ("<think>\nweigh a, b\n</think>\n\nb wins", False),
        ("weigh a, b\n</think>\n\nb wins", True),
        ("b wins", False),
    ],
)
def test_streamed_pieces_split_like_the_whole_text(text, opened, size):
    stream = ReasoningStream(opened=opened)
    trace = answer = ""
    for start in range(0, len(text), size):
        t, a = stream.feed(text[start : start + size])
        trace, answer = trace + t, answer + a
    t, a = stream.flush()
    trace, answer = trace + t, answer + a
    expected_trace, expected_answer = split_reasoning(text, opened)
    assert trace.strip() == (expected_trace or "") and answer.strip() == expected_answer


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
