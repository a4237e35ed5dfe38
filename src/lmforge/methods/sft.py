"""Supervised fine-tuning: a chat/instruction dataset -> a LoRA (or QLoRA) adapter.

Top to bottom: config -> tokenizer and template -> data -> model -> adapter -> trainer
-> train (resuming from the latest complete checkpoint when asked) -> save. Loss is the
mean cross-entropy over response tokens (prompt tokens are masked), each response ending
in the template's stop token so the model learns when to stop.
"""

from __future__ import annotations

from datasets import IterableDataset
from rich.console import Console

from lmforge.config import RunConfig
from lmforge.data.cache import sft_rows
from lmforge.data.loader import iter_examples, load_eval, peek
from lmforge.data.tokenize import TokenizeStats, iter_tokenized, pack, tokenize_examples
from lmforge.models.loading import load_tokenizer
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    resolve_template,
    train_and_save,
)
from lmforge.training.trainer import build_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """SFT's own combinations, checked before anything is loaded."""
    if config.method.name != "sft":
        raise ValueError(f"methods.sft cannot run method.name={config.method.name}")
    if config.data.format == "text":
        raise ValueError(
            "data.format is text: SFT needs instruction or chat records; use method.name: pretrain"
        )
    if config.data.streaming and config.train.max_steps <= 0:
        raise ValueError("data.streaming has no length to count epochs by: set train.max_steps")
    if config.data.streaming and config.data.packing:
        raise ValueError("data.packing needs the whole data set to bin it; turn off data.streaming")
    if config.adapter.method == "none" and config.model.quantization != "none":
        raise ValueError("a quantized base needs an adapter: set adapter.method: lora")


def _streamed(config: RunConfig, template, tokenizer) -> IterableDataset:
    """Training rows read and tokenized on the fly; the first records are checked up front."""
    peek(config.data, "sft")
    data = config.data

    def rows():
        yield from iter_tokenized(
            iter_examples(data, "sft"), template, tokenizer, data.max_length, data.train_on
        )

    return IterableDataset.from_generator(rows)


def _report(stats: TokenizeStats, max_length: int, label: str) -> None:
    console.print(
        f"[bold]{label} data[/]: {stats.examples} examples, {stats.tokens:,} tokens "
        f"({stats.label_tokens:,} trained)"
    )
    if stats.truncated:
        console.print(
            f"[yellow]warning[/]: {stats.truncated} {label} examples were longer than data.max_length="
            f"{max_length} and were truncated (e.g. {', '.join(stats.truncated_where[:2])}); raise "
            "data.max_length to keep them whole"
        )
    if stats.dropped:
        console.print(
            f"[yellow]warning[/]: {stats.dropped} {label} examples were dropped because truncation would "
            f"cut off their whole answer ({stats.dropped - stats.image_cut}) or an image's tokens "
            f"({stats.image_cut}), e.g. {', '.join(stats.dropped_where[:2])}"
        )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)

    eval_ds = None
    if config.data.streaming:
        train_ds, stats = _streamed(config, template, tokenizer), TokenizeStats()
        if config.data.eval_path:
            data = config.data
            eval_ds, _ = tokenize_examples(
                load_eval(data, "sft"), template, tokenizer, data.max_length, data.train_on
            )
    else:
        (train_ds, eval_ds, stats), cached = sft_rows(config.data, template, tokenizer)
        if not quiet:
            if cached is not None:
                console.print(f"[bold]tokenized data[/] from the cache: {cached} (data.cache: false to redo)")
            _report(stats, config.data.max_length, "train")
        if stats.examples == 0:
            raise ValueError("no training example has a response token within data.max_length")
    if config.data.packing:
        train_ds = pack(train_ds, config.data.max_length)
        if not quiet:
            console.print(f"[bold]packed[/] {stats.examples} examples into {len(train_ds)} rows")

    rows = len(train_ds) if not config.data.streaming else 0
    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, rows))

    trainer = build_trainer(config, model, tokenizer, hardware, train_ds, eval_ds, "sft", quiet)
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
