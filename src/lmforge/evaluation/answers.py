"""Final answers out of free-form completions, and whether they match a reference.

Used by GRPO/PPO's `exact_answer` reward and by the reasoning evaluation. The order follows
how reasoning models end their answers: a reasoning trace in <think>...</think> is dropped;
then the last `\\boxed{...}`; then the text after GSM8K's `####`; then the text after the last
"answer is" / "Answer:"; then the last number; else the whole remaining text.
"""

from __future__ import annotations

import re

_THINK_END = "</think>"
_GSM8K_MARK = "####"
_ANSWER_IS = re.compile(r"(?:answer is|answer:)[ \t]*", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"\$?\s*(-?\d[\d,]*(?:\.\d+)?)(?![\d,])")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_THINK_THEN_ANSWER = re.compile(r"^\s*<think>(.+?)</think>\s*\S", re.DOTALL)


def strip_reasoning(text: str) -> str:
    """The part after the last </think> (all of it when there is none)."""
    return text.rsplit(_THINK_END, 1)[-1] if _THINK_END in text else text


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced (None when there is none)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str:
    """The final answer of a completion (see the module docstring for the order)."""
    text = strip_reasoning(text).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marked = text.rsplit(_GSM8K_MARK, 1)[-1].strip() if _GSM8K_MARK in text else ""
    if marked and "\n" not in marked:  # GSM8K ends "#### 72" (a markdown heading has lines after it)
        return marked
    said = list(_ANSWER_IS.finditer(text))
    # the text after the last "answer is" (past colons, bold marks, blank lines): its number, or its
    # first sentence; nothing there falls through to the last number
    rest = (
        text[said[-1].end() :].lstrip(" \t\n:*").split("\n", 1)[0].strip().strip("*").strip() if said else ""
    )
    if rest:
        number = _LEADING_NUMBER.match(rest)
        return number.group(1) if number else re.split(r"(?<=\.)\s", rest, maxsplit=1)[0]
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text


def normalize(answer: str) -> str:
    """Compare answers by content: no surrounding space, `$`, trailing period or thousands commas;
    `5.0` reads as `5`. Leading zeros stay (`0123` is not `123`)."""
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    if _NUMBER.fullmatch(answer):
        answer = answer.replace(",", "")
        if "." in answer:
            answer = answer.rstrip("0").rstrip(".")
    return answer


def matches(completion: str, reference: object) -> bool:
    """Whether the completion's final answer equals the reference (itself extracted if free text)."""
    reference_text = str(reference)
    return normalize(extract_answer(completion)) in {
        normalize(reference_text),
        normalize(extract_answer(reference_text)),
    }


def think_then_answer(completion: str) -> bool:
    """A non-empty <think>...</think> block first, then a non-empty answer."""
    match = _THINK_THEN_ANSWER.match(completion)
    return bool(match and match.group(1).strip())
