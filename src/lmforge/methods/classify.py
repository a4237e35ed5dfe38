"""Sequence classification: {"text", "label"} records -> a classifier (adapter + head, or full).

The model is loaded as transformers' sequence classifier with one output per class: an encoder
(BERT family: a new `classifier` head on the pooled first token) or a causal LM (a new `score` head
on the last non-pad token). Loss: cross-entropy over the classes, averaged over the accumulated
batch (`losses.ce.summed_cross_entropy`). With an adapter, peft's SEQ_CLS task trains the
head whole beside the adapter (modules_to_save) and saves both.

Records: `text`, optional `text_pair` (a second text: NLI, paraphrase), and `label`: class ids
(0, 1, ...) or class names (strings, numbered in sorted order), not both. The names are saved in the
model's config as id2label/label2id, and listed in the model card. Evaluation (data.val_size or
data.eval_path) reports `eval_accuracy`.

Top to bottom: config (checked against the model's config.json) -> tokenizer -> labelled texts ->
classes -> classifier + adapter -> trainer -> train (resuming when asked) -> save.
"""

from __future__ import annotations

from rich.console import Console
from transformers import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    DataCollatorWithPadding,
)

from lmforge.config import RunConfig
from lmforge.data.files import DataError
from lmforge.data.formats import Example, class_label
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import tokenize_classification
from lmforge.models.loading import auto_config, load_tokenizer
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    train_and_save,
)
from lmforge.training.trainer import labelled_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """The method's own combinations, then the model's kind (config.json only, no weights)."""
    if config.method.name != "classify":
        raise ValueError(f"methods.classify cannot run method.name={config.method.name}")
    formats = [config.data.format, *(s.format for s in config.data.datasets)]
    if any(f not in ("auto", "text") for f in formats):
        raise ValueError(
            f"data.format is {config.data.format}: classification reads `text` records with a `label`"
        )
    if config.data.packing or config.data.streaming:
        raise ValueError(
            "classification reads whole labelled records: turn off data.packing and data.streaming"
        )
    if config.model.arch:
        raise ValueError("model.arch builds a new lab model; classification starts from a trained one")
    if config.adapter.method in ("moe_dora", "vision_lora"):
        raise ValueError(
            f"adapter.method {config.adapter.method} cannot train a classification head; use lora, dora, "
            "ia3, ... or none (full fine-tuning)"
        )
    if config.adapter.method == "none" and config.model.quantization != "none":
        raise ValueError("a quantized base needs an adapter: set adapter.method: lora")
    model_config = auto_config(config.model)
    if type(model_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ValueError(
            f"model {config.model.name_or_path} (model_type {model_config.model_type}) has no sequence-"
            "classification class in transformers; use an encoder (BERT, RoBERTa, DeBERTa) or a causal LM"
        )


def classes(train: list[Example]) -> tuple[list[str], dict[int | str, int]]:
    """(class names by id, label value -> id): class ids as given, or names numbered in sorted order."""
    values = [(class_label(e.class_label), e.where) for e in train]
    ids = [(v, where) for v, where in values if isinstance(v, int)]
    names = [(v, where) for v, where in values if isinstance(v, str)]
    if ids and names:
        raise DataError(
            f"the labels mix class ids ({ids[0][1]}: {ids[0][0]}) and class names ({names[0][1]}: "
            f"{names[0][0]!r}); use one kind for every record"
        )
    if ids:
        count = max(v for v, _ in ids) + 1
        table: dict[int | str, int] = {i: i for i in range(count)}
        labels = [str(i) for i in range(count)]
    else:
        labels = sorted({str(v) for v, _ in names})
        table = {name: i for i, name in enumerate(labels)}
    if len(set(v for v, _ in values)) < 2:
        raise DataError(
            f"the training data has only one class ({labels[-1]}); a classifier needs examples of two or more"
        )
    return labels, table


def check_known(examples: list[Example], table: dict[int | str, int]) -> None:
    for example in examples:
        if class_label(example.class_label) not in table:
            raise DataError(
                f"{example.where}: label {example.class_label!r} is not a class of the training data "
                f"({', '.join(map(str, table))}); fix the label or add training examples of it"
            )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    data = load_examples(config.data, "classify")
    labels, table = classes(data.train)
    check_known(data.eval, table)
    max_length = config.data.max_length
    train_ds, stats = tokenize_classification(data.train, tokenizer, max_length, table)
    eval_ds = tokenize_classification(data.eval, tokenizer, max_length, table)[0] if data.eval else None
    if not quiet:
        console.print(
            f"[bold]classification data[/]: {stats.examples} texts, {len(labels)} classes "
            f"({', '.join(labels[:10])}{', …' if len(labels) > 10 else ''})"
        )
        if stats.truncated:
            console.print(
                f"[yellow]warning[/]: {stats.truncated} texts were longer than data.max_length={max_length} "
                f"and were cut (e.g. {', '.join(stats.truncated_where[:2])})"
            )

    steps = optimizer_steps(config, len(train_ds))
    model, hardware = load_model_for_training(config, quiet, steps, "classify", tokenizer, labels)

    trainer = labelled_trainer(
        config,
        model,
        tokenizer,
        hardware,
        train_ds,
        eval_ds,
        "classify",
        quiet,
        DataCollatorWithPadding(tokenizer),
    )
    note = "Classes by id: " + ", ".join(f"{i} = {name}" for i, name in enumerate(labels))
    template = get_template("plain")  # recorded beside the model; a classifier has no chat format
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet, note)
