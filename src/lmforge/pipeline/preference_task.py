"""The quickstart task as preference data: on-policy pairs from an SFT model, and how to score them.

Used by the preference learning tests and `bench/preference.py`, so both measure the same thing:
the rejected side of each pair is the SFT model's own wrong answer (or a near miss where it was
right), and a model is judged on held-out pairs (preference accuracy) and held-out prompts
(greedy exact match).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lmforge.data.formats import Example
from lmforge.data.synthetic import TaskExample, is_correct, preference_records
from lmforge.data.templates import AnyTemplate, Conversation
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.training.preference import PairScores, score_pairs


def greedy_answers(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    prompts: list[str],
    max_new_tokens: int = 10,
) -> list[str]:
    engine = Engine(model, tokenizer, template)
    conversations = [Conversation(turns=[(p, "")]) for p in prompts]
    replies = engine.generate(conversations, SamplingParams(max_new_tokens=max_new_tokens), batch_size=50)
    return [r.strip() for r in replies]


def write_pairs(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    tasks: list[TaskExample],
    path: Path,
    seed: int = 0,
) -> Path:
    """Pairs for `tasks` whose rejected answers are this model's own mistakes, as alpaca JSON."""
    attempts = greedy_answers(model, tokenizer, template, [t.prompt for t in tasks])
    path.write_text(json.dumps(preference_records(tasks, attempts, seed=seed)), encoding="utf-8")
    return path


def pair_examples(path: Path) -> list[Example]:
    records = json.loads(path.read_text(encoding="utf-8"))
    return [
        Example(turns=((r["instruction"], r["chosen"]),), rejected=r["rejected"], where=f"{path} #{i}")
        for i, r in enumerate(records)
    ]


def judge(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    held: list[TaskExample],
    held_pairs: Path,
    max_length: int = 64,
) -> tuple[PairScores, float]:
    """(log-prob scores of the held-out pairs, greedy exact match on the held-out prompts)."""
    replies = greedy_answers(model, tokenizer, template, [t.prompt for t in held])
    exact = sum(is_correct(r, t) for r, t in zip(replies, held, strict=True)) / len(held)
    return score_pairs(model, tokenizer, template, pair_examples(held_pairs), max_length), exact
