"""Supervised fine-tuning: a chat/instruction dataset -> a LoRA (or QLoRA) adapter.

Top to bottom: config -> tokenizer and template -> data -> model -> adapter -> trainer
-> train (resuming from the latest complete checkpoint when asked) -> save. Loss is the
mean cross-entropy over response tokens (prompt tokens are masked), each response ending
in the template's stop token so the model learns when to stop.
"""

from __future__ import annotations

import random
from pathlib import Path

from rich.console import Console

from lmforge.config import RunConfig
from lmforge.data.formats import load_conversations
from lmforge.data.tokenize import TokenizeStats, tokenize_conversations
from lmforge.models.loading import (
    load_tokenizer,
)
from lmforge.training.artifacts import save_artifact, write_resolved_config
from lmforge.training.checkpoints import resolve_resume
from lmforge.training.stage import StageResult, load_model_for_training, resolve_template
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
    if config.adapter.method == "none" and config.model.quantization != "none":
        raise ValueError("a quantized base needs an adapter: set adapter.method: lora")


def _report(stats: TokenizeStats, max_length: int, label: str) -> None:
    console.print(
        f"[bold]{label} data[/]: {stats.examples} examples, {stats.tokens:,} tokens "
        f"({stats.label_tokens:,} trained)"
    )
    if stats.truncated:
        console.print(
            f"[yellow]warning[/]: {stats.truncated} {label} examples were longer than data.max_length="
            f"{max_length} and were truncated; raise data.max_length to keep them whole"
        )
    if stats.dropped:
        console.print(
            f"[yellow]warning[/]: {stats.dropped} {label} examples were dropped: their prompt alone "
            f"fills data.max_length={max_length}"
        )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    check(config)
    output_dir = Path(config.train.output_dir)
    write_resolved_config(config, output_dir)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config)

    conversations = load_conversations(config.data.path, config.data.format, config.data.max_samples)
    if config.data.system is not None:
        conversations = [c if c.system else type(c)(c.turns, config.data.system) for c in conversations]
    eval_conversations = []
    if config.data.eval_path:
        eval_conversations = load_conversations(config.data.eval_path, config.data.format)
    elif config.data.eval_split > 0:
        order = list(range(len(conversations)))
        random.Random(config.train.seed).shuffle(order)
        n_eval = max(1, int(len(order) * config.data.eval_split))
        eval_conversations = [conversations[i] for i in order[:n_eval]]
        conversations = [conversations[i] for i in order[n_eval:]]
    train_ds, stats = tokenize_conversations(conversations, template, tokenizer, config.data.max_length)
    eval_ds = None
    if eval_conversations:
        eval_ds, _ = tokenize_conversations(eval_conversations, template, tokenizer, config.data.max_length)
    if not quiet:
        _report(stats, config.data.max_length, "train")
    if stats.examples == 0:
        raise ValueError(f"{config.data.path}: no example has a response token within data.max_length")

    model, hardware = load_model_for_training(config, quiet)

    trainer = build_trainer(config, model, tokenizer, hardware, train_ds, eval_ds, "sft", quiet)
    resume = resolve_resume(output_dir, config.train.resume)
    if resume and not quiet:
        console.print(f"[bold]resuming[/] from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())

    kind = "adapter" if config.adapter.method != "none" else "model"
    artifact = save_artifact(trainer.model, tokenizer, template, output_dir / kind, kind, config)
    if not quiet:
        console.print(f"[bold green]saved[/] {kind} to {artifact}")
    return StageResult(output_dir, artifact, result.training_loss, result.global_step, stats, metrics)
