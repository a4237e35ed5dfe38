"""Causal-LM pre-training on plain text: next-token prediction on every token.

Texts are joined with EOS and cut into `data.max_length` blocks (GPT-2 style
concatenation, no padding). Used by the quickstart to give a tiny random model its
language before instruction tuning; the architecture lab issue extends it.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import tokenize_texts
from lmforge.models.loading import load_tokenizer
from lmforge.training.artifacts import save_artifact, write_resolved_config
from lmforge.training.checkpoints import resolve_resume
from lmforge.training.stage import StageResult, load_model_for_training, optimizer_steps, resolve_template
from lmforge.training.trainer import build_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    if config.method.name != "pretrain":
        raise ValueError(f"methods.pretrain cannot run method.name={config.method.name}")
    if config.data.format not in ("auto", "text") or any(
        s.format not in ("auto", "text") for s in config.data.datasets
    ):
        raise ValueError(f"data.format is {config.data.format}: pre-training reads plain `text` records")


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    check(config)
    output_dir = Path(config.train.output_dir)
    write_resolved_config(config, output_dir)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config) if config.data.template != "auto" else get_template("chatml")
    texts = [example.text or "" for example in load_examples(config.data, "text").train]
    train_ds, stats = tokenize_texts(texts, tokenizer, config.data.max_length)
    if not quiet:
        console.print(
            f"[bold]pretrain data[/]: {len(texts)} texts, {stats.tokens:,} tokens, {stats.examples} blocks"
        )

    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, len(train_ds)))

    trainer = build_trainer(config, model, tokenizer, hardware, train_ds, None, "pretrain", quiet)
    result = trainer.train(resume_from_checkpoint=resolve_resume(output_dir, config.train.resume))

    kind = "adapter" if config.adapter.method != "none" else "model"
    artifact = save_artifact(trainer.model, tokenizer, template, output_dir / kind, kind, config)
    if not quiet:
        console.print(f"[bold green]saved[/] {kind} to {artifact}")
    return StageResult(
        output_dir, artifact, result.training_loss, result.global_step, stats, dict(result.metrics)
    )
