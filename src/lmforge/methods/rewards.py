"""Rewards for the online RL stages (GRPO, PPO): built-ins, user functions and reward models.

Every source is a `RewardSource` with one calling convention, the one a user function has::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]

`prompts` are the last user messages, `completions` the sampled answers as text (reasoning
included), and `fields` holds each reference field of the records (e.g. `answer`) as a list
aligned with the completions, plus `completion_ids` (the token ids of each completion). Return
one finite float per completion. A source that raises, returns the wrong number of values, or
returns None/NaN/inf stops the run with an error naming the source and the sample.

A reward model is called on text: the completion is decoded by the policy's tokenizer and
re-tokenized by the reward model's own tokenizer and template, so the reward model may come from
another family (e.g. a DeBERTa reward model scoring a Llama policy).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge.config.rl import RewardSpec
from lmforge.evaluation.answers import matches, think_then_answer

# Keyword arguments trl adds for its own reward functions; user functions get the record fields.
_TRAINER_KWARGS = {"trainer_state", "log_extra", "log_metric", "environments"}


class RewardError(RuntimeError):
    """A reward source failed on a sample: the run stops rather than learn from a broken reward."""


def _text(item: Any) -> str:
    """A prompt or completion as text: trl passes conversational ones as message lists."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        users = [m for m in item if m.get("role") == "user"]
        message = users[-1] if users and item[-1].get("role") != "assistant" else item[-1]
        content = message.get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return str(item)


def exact_answer(prompts: list[str], completions: list[str], field: str = "answer", **fields) -> list[float]:
    """1.0 when the completion's final answer equals the record's reference field, else 0.0."""
    if field not in fields:
        raise KeyError(
            f"the records have no `{field}` field for exact_answer (fields: {sorted(fields)}); "
            "set the reward's `field`"
        )
    return [float(matches(c, ref)) for c, ref in zip(completions, fields[field], strict=True)]


def think_format(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """1.0 for a non-empty <think>...</think> block followed by an answer, else 0.0."""
    return [float(think_then_answer(c)) for c in completions]


def length_penalty(
    prompts: list[str], completions: list[str], target_tokens: int = 256, **fields
) -> list[float]:
    """0 up to `target_tokens` tokens, then falling linearly to -1 at twice that length."""
    lengths = [len(ids) for ids in fields["completion_ids"]]
    return [-min(1.0, max(0, n - target_tokens) / target_tokens) for n in lengths]


def regex_match(prompts: list[str], completions: list[str], pattern: str = "", **fields) -> list[float]:
    compiled = re.compile(pattern)
    return [float(compiled.search(c) is not None) for c in completions]


BUILTINS: dict[str, Callable[..., list[float]]] = {
    "exact_answer": exact_answer,
    "think_format": think_format,
    "length": length_penalty,
    "regex": regex_match,
}


def load_function(reference: str) -> Callable[..., Sequence[float]]:
    """`package.module:function` -> the function, with a clear error for each way it can be wrong."""
    module_name, _, name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward function {reference}: cannot import {module_name} ({error}); "
            "make it importable (installed, or on PYTHONPATH)"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"reward function {reference}: {module_name} has no function {name}")
    return function


class RewardModelScorer:
    """A reward model (lmforge reward folder or one-output classifier) as a text reward function."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        from lmforge.inference.reward import RewardModel

        self.model = RewardModel.load(path, device=device)

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        return self.model.score(list(zip(prompts, completions, strict=True)))


class RewardSource:
    """One configured reward: called the way trl calls reward functions, checked on every call.

    It also keeps the last batch it scored, for the samples written to the run folder.
    """

    def __init__(self, spec: RewardSpec, function: Callable[..., Sequence[float]], options: dict) -> None:
        self.spec = spec
        self.function = function
        self.options = options
        self.__name__ = spec.label  # trl logs rewards/<__name__>/mean
        self.last: list[float] = []
        self.last_prompts: list[str] = []
        self.last_completions: list[str] = []
        self.seconds = 0.0  # time spent scoring, for the step-time split

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs):
        fields = {k: v for k, v in kwargs.items() if k not in _TRAINER_KWARGS}
        prompt_texts = [_text(p) for p in prompts]
        completion_texts = [_text(c) for c in completions]
        if completion_ids is not None:
            fields["completion_ids"] = completion_ids
        return self.score(prompt_texts, completion_texts, **fields)

    def score(self, prompts: list[str], completions: list[str], **fields) -> list[float]:
        """Score text (PPO calls this directly), check the scores, and keep them as the last batch."""
        scores = self._call(prompts, completions, fields)
        self.last, self.last_prompts, self.last_completions = scores, prompts, completions
        return scores

    def _call(self, prompts: list[str], completions: list[str], fields: dict) -> list[float]:
        started = time.perf_counter()
        try:
            raw = list(self.function(prompts, completions, **self.options, **fields))
        except RewardError:
            raise
        except Exception as error:
            raise RewardError(self._describe_failure(prompts, completions, fields, error)) from error
        finally:
            self.seconds += time.perf_counter() - started
        if len(raw) != len(completions):
            raise RewardError(
                f"reward {self.spec.label} returned {len(raw)} values for {len(completions)} completions; "
                "it must return one float per completion"
            )
        for i, value in enumerate(raw):
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                sample = self._sample(prompts, completions, i)
                raise RewardError(
                    f"reward {self.spec.label} returned {value!r} for {sample}; it must be a finite number"
                )
        return [float(v) for v in raw]

    def _describe_failure(self, prompts, completions, fields, error: Exception) -> str:
        """Find the sample that makes the source raise by scoring them one at a time."""
        for i in range(len(completions)):
            one = {
                k: v[i : i + 1]
                for k, v in fields.items()
                if isinstance(v, list) and len(v) == len(completions)
            }
            try:
                list(self.function(prompts[i : i + 1], completions[i : i + 1], **self.options, **one))
            except Exception as single:
                return (
                    f"reward {self.spec.label} raised {type(single).__name__}: {single} "
                    f"on {self._sample(prompts, completions, i)}"
                )
        failure = f"{type(error).__name__}: {error}"
        return f"reward {self.spec.label} raised {failure} on the batch (on no single sample alone)"

    @staticmethod
    def _sample(prompts: list[str], completions: list[str], i: int) -> str:
        return f"sample {i} (prompt {prompts[i][:200]!r}, completion {completions[i][:200]!r})"


def build_rewards(specs: list[RewardSpec], device: str = "cpu") -> list[RewardSource]:
    """The configured sources, each loaded and ready to call."""
    sources = []
    for spec in specs:
        options: dict[str, Any] = {}
        if spec.builtin:
            function = BUILTINS[spec.builtin]
            options = {
                "exact_answer": {"field": spec.field},
                "length": {"target_tokens": spec.target_tokens},
                "regex": {"pattern": spec.pattern},
            }.get(spec.builtin, {})
        elif spec.function:
            function = load_function(spec.function)
        else:
            assert spec.model is not None
            if not Path(spec.model).exists():
                raise ValueError(
                    f"reward model {spec.model} does not exist (a folder from method.name: reward)"
                )
            function = RewardModelScorer(spec.model, device)
        sources.append(RewardSource(spec, function, options))
    return sources


def weighted_total(sources: list[RewardSource]) -> list[float]:
    """The weighted sum of each source's last scores (what the policy is trained on)."""
    return [sum(s.spec.weight * s.last[i] for s in sources) for i in range(len(sources[0].last))]


def scored_batch(sources: list[RewardSource]) -> dict[str, list]:
    """The last batch the sources scored, as plain lists (to gather from every process): its
    prompts, completions, each source's rewards and the weighted totals."""
    return {
        "prompts": sources[0].last_prompts,
        "completions": sources[0].last_completions,
        "rewards": {s.spec.label: s.last for s in sources},
        "totals": weighted_total(sources),
    }


def write_samples(path: Path, step: int, batches: list[dict[str, list]]) -> None:
    """Append scored batches (`scored_batch`), one JSON line per completion: step, prompt,
    completion, each source's reward and the weighted total."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for batch in batches:
            pairs = zip(batch["prompts"], batch["completions"], strict=True)
            for i, (prompt, completion) in enumerate(pairs):
                rewards = {label: scores[i] for label, scores in batch["rewards"].items()}
                record = {"step": step, "prompt": prompt, "completion": completion, "rewards": rewards}
                out.write(json.dumps({**record, "total": batch["totals"][i]}, ensure_ascii=False) + "\n")
