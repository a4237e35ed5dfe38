"""Multiple-choice scoring (MMLU, CMMLU, C-Eval) of a model on prompts from `benchmarks`.

Two ways to read the model's answer:

* `logits` (default): one forward per question; the answer is the option letter whose token is
  likeliest at the position after the prompt ("Answer:" / "答案："). A letter's score is its best
  spelling ("A" or " A", each kept only if it is one token that decodes to the letter), so
  tokenizers that attach the space to the letter and those that don't both work. Never invalid.
* `generate`: greedy generation of a few tokens; the answer is the first standalone A-D letter
  (no letter counts as wrong, and `no_letter` reports how often). Slower, but it is what a chat
  user sees.

`chat_template: true` puts the whole k-shot prompt in one user turn of the model's chat template
(the answer letter is then read right after the assistant header).

A prompt that does not fit the model's context loses shots from the front until it does, as
MMLU's reference `evaluate.py` does; a question that does not fit even alone is cut from the left
(its header and the start of its text), as lm-evaluation-harness crops, but unlike the harness
its options and answer cue are always kept: only when those alone do not fit is the task refused.
The questions that lost shots (`fewer_shots`) or text (`cropped`) are counted in the metrics.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from lmforge.config.eval import MultipleChoiceTask
from lmforge.data.templates import Conversation
from lmforge.evaluation import benchmarks
from lmforge.evaluation.perplexity import context_length
from lmforge.inference.engine import Engine, SamplingParams

_CUED = re.compile(
    r"(?:answer is|answer:|答案是|答案为|答案：|答案:|选)[\s*]*\(?([A-D])(?![A-Za-z])", re.IGNORECASE
)
_LEADING = re.compile(r"^\W*\(?([A-D])(?:[).:：、\]]|\s*$|\s*\n)")
# a standalone letter anywhere; "A" before a lowercase word is the article ("A good way ...")
_ANYWHERE = re.compile(r"(?<![A-Za-z])(?:([B-D])|A(?!\s+[a-z]))(?![A-Za-z])")


@dataclass
class ChoiceResult:
    accuracy: float  # over all questions
    subject_macro: float  # mean of the per-subject accuracies
    questions: int
    per_subject: dict[str, dict] = field(default_factory=dict)  # subject -> n, correct, accuracy, category
    per_category: dict[str, dict] = field(default_factory=dict)  # category -> n, correct, accuracy
    rows: list[dict] = field(default_factory=list)  # one per question: where, subject, answer, predicted
    example_prompt: str = ""
    fewer_shots: int = 0  # questions scored with fewer shots than asked, to fit the context
    cropped: int = 0  # questions whose own text was cut from the left to fit the context
    no_letter: float | None = None  # `generate` scoring: share of answers naming no option letter

    def metrics(self) -> dict:
        metrics = {
            "accuracy": self.accuracy,
            "subject_macro": self.subject_macro,
            "questions": self.questions,
            "fewer_shots": self.fewer_shots,
            "cropped": self.cropped,
            "per_category": {c: v["accuracy"] for c, v in self.per_category.items()},
            "per_subject": {s: v["accuracy"] for s, v in self.per_subject.items()},
        }
        return metrics if self.no_letter is None else {**metrics, "no_letter": self.no_letter}

    def fitting_note(self, context: int) -> str | None:
        """A line saying how many prompts were shortened to fit `context` tokens (None if none)."""
        if not (self.fewer_shots or self.cropped):
            return None
        return (
            f"{self.fewer_shots} of {self.questions} questions lost shots and {self.cropped} were cropped "
            f"from the left to fit the model's context of {context} tokens"
        )


@dataclass(frozen=True)
class Prompt:
    """One question's prompt as the model sees it, and what fitting it into the context cost."""

    text: str
    ids: list[int]
    dropped_shots: int  # shots taken off the front
    cropped: bool  # the question's own text was cut from the left


def letter_candidates(tokenizer, letters: tuple[str, ...] = benchmarks.LETTERS) -> list[list[int]]:
    """Per letter, the token ids that spell it alone ("A" and " A" where each is one token)."""
    out = []
    for letter in letters:
        ids = set()
        for spelling in (letter, " " + letter):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            token = encoded[-1] if encoded else None
            if token is not None and tokenizer.decode([token]).strip() == letter:
                ids.add(token)
        bare = tokenizer.convert_tokens_to_ids(letter)  # SentencePiece: "A" apart from "▁A" (after 答案：)
        if (
            isinstance(bare, int)
            and bare != tokenizer.unk_token_id
            and tokenizer.decode([bare]).strip() == letter
        ):
            ids.add(bare)
        if not ids:
            raise ValueError(f"the tokenizer has no single token for the option letter {letter!r}")
        out.append(sorted(ids))
    return out


def render(engine: Engine, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        text = engine.template.generation_prompt(Conversation(turns=[(prompt, "")]), engine.tokenizer)
        return engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def fitted_prompt(
    engine: Engine,
    task: MultipleChoiceTask,
    subject: str,
    shots: list[benchmarks.Question],
    question: benchmarks.Question,
    room: int,
) -> Prompt:
    """The prompt with as many of the shots as fit in `room` tokens (dropping from the front); with
    none left, the question cropped from the left (see the module docstring)."""
    for first in range(len(shots) + 1):
        text = benchmarks.build_prompt(task.benchmark, subject, shots[first:], question)
        ids = render(engine, text, task.chat_template)
        if len(ids) <= room:
            return Prompt(text, ids, dropped_shots=first, cropped=False)
    kept = benchmarks.answer_part(task.benchmark, question)
    text, ids = cropped_prompt(engine, task.chat_template, text, kept, question.where, room)
    return Prompt(text, ids, dropped_shots=len(shots), cropped=True)


def cropped_prompt(
    engine: Engine, chat_template: bool, text: str, kept: str, where: str, room: int
) -> tuple[str, list[int]]:
    """The longest end of `text` that fits in `room` tokens and still holds all of `kept` (its end),
    found by bisecting the cut position."""
    fits, cut = len(text) - len(kept), 0  # text[fits:] must fit; text[cut:] does not
    ids = render(engine, text[fits:], chat_template)
    if len(ids) > room:
        raise ValueError(
            f"{where}: the question's options and answer cue alone are {len(ids)} tokens, more than the "
            f"{room} the model's context leaves for a prompt; shorten or drop this row, or evaluate a "
            "model with a longer context"
        )
    while fits - cut > 1:
        middle = (fits + cut) // 2
        middle_ids = render(engine, text[middle:], chat_template)
        if len(middle_ids) <= room:
            fits, ids = middle, middle_ids
        else:
            cut = middle
    return text[fits:], ids


@torch.inference_mode()
def letter_scores(
    engine: Engine, prompts: list[list[int]], batch_size: int, progress: Progress | None = None
) -> torch.Tensor:
    """(prompts, letters) next-token logits of each letter's best spelling, read at each row's last
    real token (right-padded batches, so positions need no adjusting)."""
    candidates = letter_candidates(engine.tokenizer)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
    device = engine.device
    out: list[torch.Tensor] = []
    task = progress.add_task("multiple choice", total=len(prompts)) if progress else None
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=device)
        logits = engine.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = logits[torch.arange(len(batch), device=device), mask.sum(1) - 1].float()
        out.append(torch.stack([last[:, ids_].max(dim=1).values for ids_ in candidates], dim=1).cpu())
        if progress is not None:
            progress.update(task, advance=len(batch))
    return torch.cat(out)


def predict_by_logits(
    engine: Engine, prompts: list[list[int]], batch_size: int, progress: Progress | None = None
) -> list[str]:
    """The likeliest letter after each prompt."""
    scores = letter_scores(engine, prompts, batch_size, progress)
    return [benchmarks.LETTERS[i] for i in scores.argmax(dim=1).tolist()]


def first_letter(text: str) -> str:
    """The option letter a generated answer picks ("" when there is none): the letter after the
    last "answer is" / "答案是", else a letter opening the answer ("B", "(C) ...", "A. 42"), else
    the first standalone letter (not the article "A")."""
    cued = _CUED.findall(text)
    if cued:
        return cued[-1].upper()
    for pattern in (_LEADING, _ANYWHERE):
        match = pattern.search(text)
        if match:
            return match.group(1) or match.group(0)
    return ""


def predict_by_generation(
    engine: Engine, prompts: list[str], chat_template: bool, batch_size: int
) -> list[str]:
    params = SamplingParams(max_new_tokens=16)
    if chat_template:
        conversations = [Conversation(turns=[(p, "")]) for p in prompts]
        texts = engine.generate(conversations, params, batch_size)
    else:
        texts = []
        for start in range(0, len(prompts), batch_size):
            texts += [g.text for g in engine.complete(prompts[start : start + batch_size], params)]
    return [first_letter(t) for t in texts]


def evaluate_choices(engine: Engine, task: MultipleChoiceTask, quiet: bool = True) -> ChoiceResult:
    """Accuracy of `engine`'s model on the task's benchmark, per subject and category."""
    root = Path(task.path)
    split = task.split or ("val" if task.benchmark == "ceval" else "test")
    scored = benchmarks.load_split(task.benchmark, root, split, task.subjects)
    dev = benchmarks.load_split(task.benchmark, root, "dev", list(scored)) if task.shots else {}
    if split == "dev" and task.shots:
        raise ValueError("split: dev with shots > 0 would show questions their own answers; use shots: 0")
    room = context_length(engine.model, cap=None) - (16 if task.scoring == "generate" else 1)
    prompts: list[Prompt] = []
    questions: list[benchmarks.Question] = []
    for subject, items in scored.items():
        shots = benchmarks.shots_for(dev.get(subject, []), task.shots) if task.shots else []
        for question in items[: task.limit] if task.limit else items:
            if not question.answer:
                raise ValueError(
                    f"{question.where}: no answer in the {split} split; score a split with answers "
                    "(C-Eval's test answers are not published: use split: val)"
                )
            prompts.append(fitted_prompt(engine, task, subject, shots, question, room))
            questions.append(question)
    with Progress(disable=quiet, transient=True) as progress:
        if task.scoring == "logits":
            predicted = predict_by_logits(engine, [p.ids for p in prompts], task.batch_size, progress)
        else:
            predicted = predict_by_generation(
                engine, [p.text for p in prompts], task.chat_template, task.batch_size
            )
    result = tally(task.benchmark, questions, predicted, prompts[0].text if prompts else "")
    record_fitting(result, prompts)
    if task.scoring == "generate" and predicted:
        result.no_letter = predicted.count("") / len(predicted)
    return result


def record_fitting(result: ChoiceResult, prompts: list[Prompt]) -> None:
    """Count, and mark in each question's row, the prompts shortened to fit the context."""
    for row, prompt in zip(result.rows, prompts, strict=True):
        row.update(dropped_shots=prompt.dropped_shots, cropped=prompt.cropped)
    result.fewer_shots = sum(p.dropped_shots > 0 for p in prompts)
    result.cropped = sum(p.cropped for p in prompts)


def tally(
    kind: benchmarks.Kind,
    questions: list[benchmarks.Question],
    predicted: list[str],
    example_prompt: str = "",
) -> ChoiceResult:
    """Accuracy overall (micro), per subject, per category, and the subject macro-average."""
    per_subject: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    per_category: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    rows = []
    for question, answer in zip(questions, predicted, strict=True):
        correct = answer == question.answer
        # CMMLU's "China specific" overlaps its other groups: a subject counts in every group it is in
        groups = benchmarks.groups_of(kind, question.subject)
        for bucket in (per_subject[question.subject], *(per_category[g] for g in groups)):
            bucket["n"] += 1
            bucket["correct"] += int(correct)
        per_subject[question.subject]["category"] = benchmarks.category_of(kind, question.subject)
        rows.append(
            {
                "where": question.where,
                "subject": question.subject,
                "answer": question.answer,
                "predicted": answer,
            }
        )
    for bucket in (*per_subject.values(), *per_category.values()):
        bucket["accuracy"] = bucket["correct"] / bucket["n"]
    total = len(questions)
    return ChoiceResult(
        accuracy=sum(r["answer"] == r["predicted"] for r in rows) / total if total else 0.0,
        subject_macro=sum(b["accuracy"] for b in per_subject.values()) / len(per_subject)
        if per_subject
        else 0.0,
        questions=total,
        per_subject=dict(sorted(per_subject.items())),
        per_category=dict(sorted(per_category.items())),
        rows=rows,
        example_prompt=example_prompt,
    )
