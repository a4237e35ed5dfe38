"""The `lmforge eval` config: which models to evaluate and on which tasks.

```yaml
output_dir: runs/eval
models:                        # one or more; each is evaluated on every task
  - {name: base, path: runs/quickstart/pretrain/final}
  - {name: sft, path: runs/quickstart/pretrain/final, adapter: runs/quickstart/sft/final}
tasks:
  - {kind: perplexity, data: data/heldout.json}
  - {kind: multiple_choice, benchmark: mmlu, path: /data/mmlu, shots: 5}
  - {kind: generation, data: data/heldout.json, metrics: [exact_match, rouge, bleu]}
  - {kind: reasoning, data: gsm8k_test.jsonl}
  - {kind: function_calling, data: tool_calls.jsonl}
  - {kind: multimodal, data: vqa/data.json}
  - {kind: suite, suite: general}
  - {kind: harness, tasks: [hellaswag]}
```
A task's `data` is a dataset source as in training configs: a path string, or a mapping with
`path`, `format`, `columns`, `max_samples`, ...
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section
from lmforge.config.data import DatasetSource

Metric = Literal["exact_match", "rouge", "bleu", "bertscore"]


def _source(value: object) -> object:
    return {"path": value} if isinstance(value, str) else value


class EvalModel(Section):
    """One model (or checkpoint) to evaluate."""

    name: str = Field("", description="Its column in the report (default: the folder name).")
    path: str = Field(
        ..., min_length=1, description="A model folder or hub id (the base when `adapter` is set)."
    )
    adapter: str | None = Field(None, description="An adapter folder to load on top of `path`.")
    template: str | None = Field(
        None, description="Chat template (default: saved with the model, or guessed)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps, ...")

    @model_validator(mode="after")
    def _default_name(self) -> EvalModel:
        if not self.name:
            source = (self.adapter or self.path).rstrip("/")
            parts = [p for p in source.split("/") if p]
            # runs/x/sft/final -> "sft/final": the folder name alone is often just "final"
            if not parts:
                raise ValueError(f"cannot name a model from {source!r}; give it a `name`")
            self.name = "/".join(parts[-2:]) if parts[-1] in ("final", "merged") else parts[-1]
        return self


class GenerationSettings(Section):
    """How answers are generated for generation, reasoning, multimodal and suite tasks."""

    max_new_tokens: int = Field(256, gt=0, description="Longest answer.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default, reproducible).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (temperature > 0).")
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = Field(16, gt=0, description="Prompts per generate call.")
    system: str | None = Field(None, description="System prompt for every query.")


class TaskBase(Section):
    name: str = Field("", description="Its name in the results (default: the kind, numbered if repeated).")
    limit: int | None = Field(None, gt=0, description="Use only the first N items (per subject for MC).")


class PerplexityTask(TaskBase):
    """exp(mean token NLL). Text records: every token, long texts in sliding windows. Chat records:
    only the assistant's tokens, given the conversation before them."""

    kind: Literal["perplexity"]
    data: DatasetSource = Field(..., description="Text (`text`) or chat/instruction records.")
    window: int | None = Field(None, gt=1, description="Tokens per forward (default: the model's context).")
    stride: int | None = Field(
        None,
        gt=0,
        description="Tokens a window advances; each window scores only its new tokens (default: window/2).",
    )
    batch_size: int = Field(8, gt=0, description="Windows per forward.")

    _coerce = field_validator("data", mode="before")(_source)

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityTask:
        if self.window and self.stride and self.stride > self.window:
            raise ValueError(
                f"stride {self.stride} is larger than window {self.window}: tokens would be skipped"
            )
        return self


class MultipleChoiceTask(TaskBase):
    """MMLU, CMMLU or C-Eval from a local folder in its published layout."""

    kind: Literal["multiple_choice"]
    benchmark: Literal["mmlu", "cmmlu", "ceval"] = Field(..., description="Which layout and categories.")
    path: str = Field(..., description="The benchmark's folder (with dev/, val/, test/).")
    split: str | None = Field(
        None, description="Scored split (default: test; C-Eval: val, its test has no answers)."
    )
    shots: int = Field(5, ge=0, description="Examples from the dev split before each question.")
    subjects: list[str] | None = Field(
        None, min_length=1, description="Only these subjects (default: all found)."
    )
    scoring: Literal["logits", "generate"] = Field(
        "logits", description="logits: the likeliest option letter next; generate: the first letter answered."
    )
    chat_template: bool = Field(False, description="Wrap the prompt in the model's chat template.")
    batch_size: int = Field(8, gt=0, description="Questions per forward.")


class GenerationTask(TaskBase):
    """Metrics of generated answers against references: generate with each model from `data`, or
    score an existing `lmforge predict` output (`predictions`, no model needed)."""

    kind: Literal["generation"]
    data: DatasetSource | None = Field(None, description="Records whose answers are the references.")
    predictions: str | None = Field(None, description="A predict jsonl to score instead of generating.")
    metrics: list[Metric] = Field(
        default_factory=lambda: ["exact_match", "rouge", "bleu"], description="Which metrics."
    )
    bertscore_model: str | None = Field(
        None, description="Local folder of the BERTScore model (e.g. a downloaded roberta-large)."
    )
    bertscore_layers: int | None = Field(
        None, gt=0, description="Its layer to use (default: bert-score's or the last)."
    )

    _coerce = field_validator("data", mode="before")(_source)

    @model_validator(mode="after")
    def _one_source(self) -> GenerationTask:
        if (self.data is None) == (self.predictions is None):
            raise ValueError(
                "a generation task needs exactly one of `data` (generate) or `predictions` (score)"
            )
        if "bertscore" in self.metrics and not self.bertscore_model:
            raise ValueError(
                "metric bertscore needs bertscore_model: a local folder of the model to score with"
            )
        return self


class ReasoningTask(TaskBase):
    """Final-answer accuracy on question/answer records (GSM8K-style `question`/`answer`), with
    `<think>` compliance, reasoning length statistics and a sample of failures."""

    kind: Literal["reasoning"]
    data: DatasetSource = Field(..., description="Question records with reference answers.")
    failures: int = Field(5, ge=0, description="Failed answers to keep in the results.")

    _coerce = field_validator("data", mode="before")(_source)


class FunctionCallingTask(TaskBase):
    """Tool calls against expected ones (docs/tools.md): call/no-call, name, argument accuracy."""

    kind: Literal["function_calling"]
    data: DatasetSource = Field(
        ..., description="Tool-use records whose last assistant turn holds the expected calls (or none)."
    )

    _coerce = field_validator("data", mode="before")(_source)


class MultimodalTask(TaskBase):
    """Accuracy on image question/answer records (a vision-language model)."""

    kind: Literal["multimodal"]
    data: DatasetSource = Field(..., description="Image-text records; images resolved inside their folder.")
    match: Literal["exact", "option"] = Field(
        "exact",
        description="exact: normalised answer equals the reference; option: the chosen option (letter or "
        "text) equals the reference's",
    )

    _coerce = field_validator("data", mode="before")(_source)


class SuiteTask(TaskBase):
    """A suite of test queries by category, for comparing stages side by side."""

    kind: Literal["suite"]
    suite: str = Field("general", description="A bundled suite (general, quickstart) or a suite YAML file.")


class HarnessTask(TaskBase):
    """lm-evaluation-harness (`pip install lmforge[harness]`), for users with its data sets."""

    kind: Literal["harness"]
    tasks: list[str] = Field(..., min_length=1, description="Harness task names.")
    shots: int | None = Field(None, ge=0, description="num_fewshot (default: each task's own).")
    batch_size: int = Field(8, gt=0, description="Harness batch size.")


Task = Annotated[
    PerplexityTask
    | MultipleChoiceTask
    | GenerationTask
    | ReasoningTask
    | FunctionCallingTask
    | MultimodalTask
    | SuiteTask
    | HarnessTask,
    Field(discriminator="kind"),
]


class EvalConfig(Section):
    output_dir: str = Field("runs/eval", description="Where results.json, results.md and report.html go.")
    models: list[EvalModel] = Field(default_factory=list, description="Models or checkpoints to evaluate.")
    tasks: list[Task] = Field(..., min_length=1, description="What to measure on each model.")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Decoding for generated answers."
    )
    dataset_dir: str = Field(".", description="Where registry names and relative data paths are looked up.")

    @model_validator(mode="after")
    def _names(self) -> EvalConfig:
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"models named more than once: {', '.join(repeated)}; give each a distinct `name`"
            )
        needs_model = [t.kind for t in self.tasks if not (t.kind == "generation" and t.predictions)]
        if needs_model and not self.models:
            raise ValueError(
                f"tasks {', '.join(sorted(set(needs_model)))} need at least one entry under `models`"
            )
        seen: dict[str, int] = {}
        for task in self.tasks:
            if not task.name:
                count = seen.get(task.kind, 0)
                seen[task.kind] = count + 1
                task.name = task.kind if count == 0 else f"{task.kind}-{count + 1}"
        task_names = [t.name for t in self.tasks]
        repeated = sorted({n for n in task_names if task_names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"tasks named more than once: {', '.join(repeated)}; give each a distinct `name`"
            )
        return self
