"""Accuracy of a vision-language model on image question/answer records.

Records are any image-text layout lmforge reads (images resolved inside the data set's folder);
the reference is the record's answer (`output`, the assistant message, or an `answer` field).

* `exact`: the normalised answer equals the normalised reference (case, surrounding space and
  punctuation ignored; a trailing period is not an error).
* `option`: the record lists its options (`options` or `choices`, shown to the model in the
  prompt by the data set itself); the model's choice is the first standalone letter it writes, or
  else the one option whose text it contains; the reference may be a letter or an option's text.
"""

from __future__ import annotations

import re
import string

from lmforge.data.formats import Example
from lmforge.evaluation.choice import first_letter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.inference.predict import prompt_conversation, reference_of

_SPACE = re.compile(r"\s+")
_EDGE_PUNCTUATION = string.punctuation + "。，、！？：；「」（）"


def normalize_text(text: str) -> str:
    return _SPACE.sub(" ", text).strip().strip(_EDGE_PUNCTUATION).strip().casefold()


def options_of(example: Example) -> list[str]:
    options = example.reference.get("options", example.reference.get("choices"))
    if not isinstance(options, list) or len(options) < 2:
        raise ValueError(
            f"{example.where}: match: option needs the record's `options` (or `choices`): "
            "a list of 2 or more answers"
        )
    return [str(o) for o in options]


def option_index(text: str, options: list[str]) -> int | None:
    """Which option `text` picks: an option's whole text, else the one option whose text it
    contains, else the option letter it gives (None: no pick, or an ambiguous one)."""
    said = normalize_text(text)
    exact = [i for i, o in enumerate(options) if normalize_text(o) == said]
    if exact:
        return exact[0]
    contained = [i for i, o in enumerate(options) if normalize_text(o) and normalize_text(o) in said]
    if len(contained) == 1:
        return contained[0]
    letter = first_letter(text) if len(options) <= 4 else ""
    if letter and ord(letter) - ord("A") < len(options):
        return ord(letter) - ord("A")
    return None


def is_correct(output: str, example: Example, match: str) -> bool:
    reference = reference_of(example)
    if reference is None:
        raise ValueError(f"{example.where}: no reference answer to check against")
    if match == "exact":
        return normalize_text(output) == normalize_text(str(reference))
    options = options_of(example)
    wanted = option_index(str(reference), options)
    if wanted is None:
        raise ValueError(
            f"{example.where}: the reference {reference!r} is neither a letter nor one of the options"
        )
    return option_index(output, options) == wanted


def evaluate_multimodal(
    engine: Engine,
    examples: list[Example],
    params: SamplingParams,
    match: str = "exact",
    batch_size: int = 8,
    system: str | None = None,
) -> dict:
    if not any(e.images for e in examples):
        raise ValueError("no record has an image: a multimodal task needs image question/answer records")
    conversations = [prompt_conversation(e, system) for e in examples]
    images = [list(e.images) for e in examples]
    outputs = engine.generate(conversations, params, batch_size, images)
    rows = [
        {
            "where": e.where,
            "prompt": e.prompt,
            "output": o,
            "reference": reference_of(e),
            "correct": is_correct(o, e, match),
        }
        for e, o in zip(examples, outputs, strict=True)
    ]
    return {
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "items": len(rows),
        "failures": [r for r in rows if not r["correct"]][:5],
        "_rows": rows,
    }
