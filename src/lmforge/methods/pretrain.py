"""Causal-LM pre-training on plain text: next-token prediction on every token.

Texts (txt/jsonl/parquet files, folders, hub datasets; several mixed by weight, or streamed)
end with EOS and are packed into `data.max_length` blocks. With `method.document_boundaries`
(the default) position ids and attention restart at every document inside a block, so a
document never attends to the one before it; off, blocks are one GPT-2 style stream. The
model is loaded (`model.name_or_path`: continue pre-training) or built new from a lab
architecture (`model.arch`). Progress shows tokens/s; metrics.jsonl counts tokens seen.
"""

from __future__ import annotations

from datasets import Dataset, IterableDataset
from rich.console import Console

from lmforge.config import RunConfig
from lmforge.data.loader import iter_examples, load_eval, load_examples, peek
from lmforge.data.templates import get_template
from lmforge.data.tokenize import TokenizeStats, text_blocks, text_documents, tokenize_texts
from lmforge.models.loading import arch_tokenizer, load_tokenizer
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
    if config.method.name != "pretrain":
        raise ValueError(f"methods.pretrain cannot run method.name={config.method.name}")
    if config.data.format not in ("auto", "text") or any(
        s.format not in ("auto", "text") for s in config.data.datasets
    ):
        raise ValueError(f"data.format is {config.data.format}: pre-training reads plain `text` records")
    if config.data.packing:
        raise ValueError(
            "data.packing is for SFT: pre-training always packs text into data.max_length blocks "
            "(method.document_boundaries sets whether attention crosses documents); remove it"
        )
    if config.data.streaming and config.train.max_steps <= 0:
        raise ValueError("data.streaming has no length to count epochs by: set train.max_steps")


def _streamed(config: RunConfig, tokenizer) -> IterableDataset:
    """Blocks read, tokenized and packed on the fly; the first records are checked up front."""
    peek(config.data, "text")
    data, boundaries = config.data, config.method.document_boundaries

    def rows():
        texts = (example.text or "" for example in iter_examples(data, "text"))
        yield from text_blocks(text_documents(texts, tokenizer), data.max_length, boundaries)

    return IterableDataset.from_generator(rows)


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = arch_tokenizer(config.model.arch) if config.model.arch else load_tokenizer(config.model)
    auto = config.data.template == "auto"
    template = get_template("chatml") if auto else resolve_template(config, tokenizer)
    max_length, boundaries = config.data.max_length, config.method.document_boundaries

    def blocks(examples) -> tuple[Dataset, TokenizeStats]:
        return tokenize_texts((e.text or "" for e in examples), tokenizer, max_length, boundaries)

    eval_ds: Dataset | None = None
    if config.data.streaming:
        train_ds, stats = _streamed(config, tokenizer), TokenizeStats()
        if config.data.eval_path:
            eval_ds, _ = blocks(load_eval(config.data, "text"))
        rows = 0
    else:
        data = load_examples(config.data, "text")
        train_ds, stats = blocks(data.train)
        if data.eval:
            eval_ds, _ = blocks(data.eval)
        if stats.examples == 0:
            raise ValueError("the pre-training texts hold fewer than 2 tokens: nothing to learn")
        rows = len(train_ds)
        if not quiet:
            console.print(
                f"[bold]pretrain data[/]: {len(data.train)} texts, {stats.tokens:,} tokens in {rows} "
                f"blocks of {max_length}"
                + (" (attention within documents)" if boundaries else " (attention across documents)")
            )

    model, hardware = load_model_for_training(
        config, quiet, optimizer_steps(config, rows), tokenizer=tokenizer
    )
    trainer = build_trainer(config, model, tokenizer, hardware, train_ds, eval_ds, "pretrain", quiet)
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
