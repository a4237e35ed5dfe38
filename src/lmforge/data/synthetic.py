"""The quickstart's synthetic task: sort distinct digits, checkable by exact match.

An item is a string of 3 to 6 distinct digits (``"5183"``); its answer is the same digits
in ascending order (``"1358"``). The quickstart teaches this skill twice, in two surface
forms:

* pre-training sees plain text lines ``sort 5183 -> 1358``, mixed with filler sentences;
* SFT sees the instruction form, through the ChatML template:
  user ``Sort the digits: 5183``, assistant ``1358``.

Before SFT the model has never seen the chat format, so it does not answer chat prompts
(held-out exact match is ~0); a short LoRA SFT connects the format to the skill the model
already has, and held-out exact match rises to ~100%.

Why it is checkable: every answer is a deterministic function of the prompt, so exact
match (after stripping whitespace) is the whole metric. The tokenizer splits every digit
into its own token, so the answer never depends on how BPE happens to merge digits.

Why held-out means held out: the item space is split once, by a hash of the item's digit
*set* (its answer), independent of any seed. Held-out prompts are drawn only from the
held-out side, so neither a held-out prompt's digits in any order nor its answer occur in
training prompts or pre-training lines; `pretrain_corpus` also drops any line whose digits
are in its `exclude` set. Generalising to them needs the skill, not memory.

Why sorting: among the skills tried (reversal, 2-digit addition, sorting), a tiny Llama
learns sorting from plain text fastest and most reliably (content-based attention: the
next output digit is the smallest input digit above the previous one).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypedDict

MIN_DIGITS: Final = 3
MAX_DIGITS: Final = 6
HELDOUT_BUCKETS: Final = 10  # 1 in 10 items (by hash) is reserved for held-out evaluation
INSTRUCTION: Final = "Sort the digits: {digits}"
PRETRAIN_LINE: Final = "sort {digits} -> {answer}"
FILLER_FRACTION: Final = 0.2  # share of pre-training lines that are plain sentences

_DIGIT_RUN = re.compile(r"\d+")

# A tiny grammar for filler sentences: plain English text, no digits.
_SUBJECTS = (
    "the cat|a dog|the old man|my sister|the teacher|a small bird|the farmer|our neighbour|"
    "the child|a tired horse|the baker|his friend"
).split("|")
_VERBS = (
    "sees|likes|finds|carries|paints|watches|"
    "follows|builds|cleans|opens|moves|holds|draws|pushes|lifts|washes"
).split("|")
_OBJECTS = (
    "the red ball|a green door|the long road|a warm coat|the blue boat|an empty box|"
    "the tall tree|a quiet room|the yellow hat|a wooden chair"
).split("|")
_ENDINGS = (
    "in the morning|after lunch|near the river|every day|at night|in the garden|"
    "with great care|before the rain|on the hill|again"
).split("|")


@dataclass(frozen=True)
class TaskExample:
    """One instruction (the user turn) and its only correct answer."""

    prompt: str
    answer: str


Split = tuple[list[TaskExample], list[TaskExample]]  # (training, held-out)


class QuickstartSizes(TypedDict):
    """Model, data and training sizes of `lmforge quickstart` (2 CPU cores, a few minutes)."""

    n_train: int
    n_heldout: int
    pretrain_lines: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    pretrain_seq_len: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    lora_r: int
    lora_alpha: float
    sft_steps: int
    sft_batch: int
    sft_lr: float
    dpo_pairs: int
    dpo_steps: int
    max_new_tokens: int


QUICKSTART_SIZES: Final[QuickstartSizes] = {
    "n_train": 2000,
    "n_heldout": 200,
    "pretrain_lines": 40000,
    "vocab_size": 512,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "max_positions": 256,
    "pretrain_seq_len": 64,
    "pretrain_steps": 400,
    "pretrain_batch": 32,
    "pretrain_lr": 1e-3,
    "lora_r": 16,
    "lora_alpha": 32.0,
    "sft_steps": 150,
    "sft_batch": 32,
    "sft_lr": 3e-3,
    "dpo_pairs": 400,
    "dpo_steps": 25,
    "max_new_tokens": 12,  # answers are at most MAX_DIGITS tokens, plus the stop token
}


def solve(digits: str) -> str:
    """The task itself: the digits in ascending order."""
    return "".join(sorted(digits))


def is_heldout_item(digits: str) -> bool:
    """Whether an item is on the held-out side of the split (decided by its digit set)."""
    key = solve(digits).encode("ascii")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % HELDOUT_BUCKETS == 0


def _random_item(rng: random.Random) -> str:
    length = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return "".join(rng.sample("0123456789", length))


def side_size(heldout: bool) -> int:
    """How many distinct items one side of the split holds."""
    return sum(
        math.factorial(length)
        for length in range(MIN_DIGITS, MAX_DIGITS + 1)
        for digits in itertools.combinations("0123456789", length)
        if is_heldout_item("".join(digits)) == heldout
    )


def _sample_items(rng: random.Random, n: int, heldout: bool) -> list[str]:
    """`n` distinct items from one side of the split, in sampling order."""
    available = side_size(heldout)
    if n > available // 2:  # rejection sampling slows down as the side runs out
        side = "held-out" if heldout else "training"
        raise ValueError(f"asked for {n} {side} items; at most {available // 2} are supported")
    seen: set[str] = set()
    items: list[str] = []
    while len(items) < n:
        item = _random_item(rng)
        if item not in seen and is_heldout_item(item) == heldout:
            seen.add(item)
            items.append(item)
    return items


def example_for(digits: str) -> TaskExample:
    """The instruction and answer for one item."""
    return TaskExample(prompt=INSTRUCTION.format(digits=digits), answer=solve(digits))


def make_task_split(seed: int, n_train: int, n_heldout: int) -> Split:
    """(training, held-out) instructions; their items, and their answers, never overlap."""
    rng = random.Random(f"task-split-{seed}")
    train = [example_for(d) for d in _sample_items(rng, n_train, heldout=False)]
    heldout = [example_for(d) for d in _sample_items(rng, n_heldout, heldout=True)]
    return train, heldout


def _filler(rng: random.Random) -> str:
    words = [rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)]
    sentence = " ".join(words)
    return f"{sentence[0].upper()}{sentence[1:]}."


def pretrain_corpus(seed: int, n_lines: int, exclude: set[str]) -> list[str]:
    """Plain-text pre-training lines: ``sort 5183 -> 1358`` lines and filler sentences.

    `exclude` holds strings that must never appear as an item or an answer: held-out
    prompts, answers, or bare digit strings (every run of digits in them is excluded).
    Items come only from the training side of the split in any case.
    """
    banned = {run for text in exclude for run in _DIGIT_RUN.findall(text)}
    rng = random.Random(f"pretrain-{seed}")
    lines: list[str] = []
    while len(lines) < n_lines:
        if rng.random() < FILLER_FRACTION:
            lines.append(_filler(rng))
            continue
        digits = _random_item(rng)
        answer = solve(digits)
        if is_heldout_item(digits) or digits in banned or answer in banned:
            continue
        lines.append(PRETRAIN_LINE.format(digits=digits, answer=answer))
    return lines


def tokenizer_corpus() -> list[str]:
    """Text to train the quickstart tokenizer on: every word and character the task uses."""
    rng = random.Random("tokenizer")
    lines = [_filler(rng) for _ in range(400)]
    lines += [PRETRAIN_LINE.format(digits=d, answer=solve(d)) for d in ("5183", "907", "426310")]
    lines += [INSTRUCTION.format(digits=d) for d in ("5183", "907", "426310")]
    lines += [
        "system user assistant",
        "Hello! How are you? I am fine, thanks.",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789",
        "., ;: !? '\" ()[]{} -> <> + - * / = _ # @ & % $",
    ]
    return lines


def is_correct(prediction: str, example: TaskExample) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == example.answer.strip()


def to_alpaca_records(examples: Iterable[TaskExample]) -> list[dict[str, str]]:
    """Alpaca records (instruction = the prompt, empty input, output = the answer)."""
    return [{"instruction": ex.prompt, "input": "", "output": ex.answer} for ex in examples]


def plausible_wrong(answer: str, rng: random.Random) -> str:
    """A near miss: the sorted answer with one adjacent pair of digits swapped."""
    digits = list(answer)
    i = rng.randrange(len(digits) - 1)
    digits[i], digits[i + 1] = digits[i + 1], digits[i]
    return "".join(digits)


def preference_records(
    examples: Iterable[TaskExample], attempts: Iterable[str], seed: int = 0
) -> list[dict[str, str]]:
    """Preference pairs for the task: the right answer chosen, a plausible wrong one rejected.

    `attempts` are a model's own answers to the same prompts (e.g. greedy generations of the SFT
    model): a wrong attempt is the most useful rejected answer, the mistake this model makes
    (on-policy negatives). Where the attempt was right, a near miss (`plausible_wrong`) stands in.
    """
    rng = random.Random(seed)
    records = []
    for example, attempt in zip(examples, attempts, strict=True):
        attempt = attempt.strip()
        rejected = (
            attempt if attempt and not is_correct(attempt, example) else plausible_wrong(example.answer, rng)
        )
        records.append({"instruction": example.prompt, "chosen": example.answer, "rejected": rejected})
    return records
