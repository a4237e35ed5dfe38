"""Reasoning quality on question/answer records (GSM8K-style `question`/`answer`).

Per answer: the final answer is extracted (`evaluation.answers`: after `</think>`, the last
`\\boxed{}`, GSM8K's `####`, "answer is", the last number) and compared with the reference's.
Reported: accuracy; `<think>` format compliance (a non-empty trace, then a non-empty answer; a
trace the prompt opened, as DeepSeek-R1's template does, counts); how many answers were cut off
by max_new_tokens; completion and reasoning length statistics in tokens; and a sample of failures
(prompt, output, extracted answer, reference) to read.
"""

from __future__ import annotations

import statistics

from lmforge.data.formats import Example
from lmforge.evaluation.answers import extract_answer, matches
from lmforge.inference.engine import Engine, Generation, SamplingParams
from lmforge.inference.predict import prompt_conversation, reference_of
from lmforge.inference.reasoning import prompt_opens_reasoning, split_reasoning


def length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def score_reasoning(
    examples: list[Example],
    generations: list[Generation],
    opened: bool,
    count_tokens,
    failures: int = 5,
) -> dict:
    """Metrics of generated answers (`opened`: the prompt opened a `<think>` block)."""
    rows = []
    for example, generation in zip(examples, generations, strict=True):
        reference = reference_of(example)
        if reference is None:
            raise ValueError(f"{example.where}: no reference answer (an `answer` field) to check against")
        trace, answer = split_reasoning(generation.text, opened)
        # only the answer counts: a trace cut off before </think> has no answer, whatever numbers it holds
        rows.append(
            {
                "where": example.where,
                "prompt": example.prompt,
                "output": generation.text,
                "extracted": extract_answer(answer) if answer else "",
                "reference": extract_answer(str(reference)),
                "correct": bool(answer) and matches(answer, reference),
                "compliant": bool(trace) and bool(answer),
                "has_trace": trace is not None,
                "cut_off": generation.finish_reason == "length",
                "completion_tokens": generation.completion_tokens,
                "reasoning_tokens": count_tokens(trace) if trace is not None else None,
            }
        )
    n = len(rows)
    with_trace = [r for r in rows if r["has_trace"]]
    return {
        "accuracy": sum(r["correct"] for r in rows) / n,
        "items": n,
        "think_compliance": sum(r["compliant"] for r in rows) / n,
        "with_reasoning": len(with_trace) / n,
        "accuracy_with_reasoning": (
            sum(r["correct"] for r in with_trace) / len(with_trace) if with_trace else None
        ),
        "cut_off": sum(r["cut_off"] for r in rows) / n,
        "completion_tokens": length_stats([r["completion_tokens"] for r in rows]),
        "reasoning_tokens": length_stats([r["reasoning_tokens"] for r in with_trace]),
        "failures": [
            {k: r[k] for k in ("where", "prompt", "output", "extracted", "reference")}
            for r in rows
            if not r["correct"]
        ][:failures],
        "_rows": rows,
    }


def evaluate_reasoning(
    engine: Engine,
    examples: list[Example],
    params: SamplingParams,
    batch_size: int = 16,
    failures: int = 5,
    system: str | None = None,
) -> dict:
    conversations = [prompt_conversation(e, system) for e in examples]
    images = [list(e.images) for e in examples] if any(e.images for e in examples) else None
    generations = engine.generate_detailed(conversations, params, batch_size, images)
    opened = prompt_opens_reasoning(engine.prompt_text(conversations[0]))

    def count_tokens(text: str) -> int:
        return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    return score_reasoning(examples, generations, opened, count_tokens, failures)
