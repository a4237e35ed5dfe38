"""Preference pairs -> a reward model: Bradley-Terry through trl's RewardTrainer, with an adapter.

The model is the base loaded as a sequence classifier with one output: the base's weights plus a
new scalar head (`score`). The adapter trains with the head (peft's SEQ_CLS task saves the head
beside the adapter). The loss is -log sigmoid(r(chosen) - r(rejected)), minus each pair's
`margin` field when `method.margin` is on (the Llama 2 paper's margin). `center_rewards` adds
trl's term pulling rewards to mean zero. A response is scored on the whole conversation, rendered
with the stage's template, ending with the stop token. `lmforge reward score` scores the same way,
and PPO/GRPO load the saved folder with `inference.reward.RewardModel`.

Top to bottom: config -> tokenizer and template -> pairs -> classifier + adapter -> trainer ->
train -> save the adapter (+ head) with the tokenizer and template.
"""

from __future__ import annotations

from rich.console import Console
from trl import RewardConfig, RewardTrainer

from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.loading import load_tokenizer
from lmforge.training.preference import pair_dataset, use_template
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    resolve_template,
    train_and_save,
)
from lmforge.training.trainer import common_arguments, stage_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    if config.method.name != "reward":
        raise ValueError(f"methods.reward cannot run method.name={config.method.name}")
    if config.adapter.method in ("none", "moe_dora", "vision_lora"):
        raise ValueError(
            "a reward model trains a peft adapter with its score head; adapter.method "
            f"{config.adapter.method} cannot (use lora, dora, adalora, ...)"
        )
    if config.data.streaming or config.data.packing:
        raise ValueError("reward reads the whole pair data set unpacked; turn off data.streaming and packing")


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    use_template(tokenizer, template)
    data = load_examples(config.data, "preference")
    train_ds = pair_dataset(data.train, "reward", with_margin=config.method.margin)
    eval_ds = pair_dataset(data.eval, "reward", with_margin=config.method.margin) if data.eval else None

    steps = optimizer_steps(config, len(train_ds))
    model, hardware = load_model_for_training(config, quiet, steps, task="reward", tokenizer=tokenizer)
    args = RewardConfig(
        **common_arguments(config.train, hardware, eval_ds is not None),
        max_length=config.data.max_length,
        center_rewards_coefficient=config.method.center_rewards,
    )
    trainer = stage_trainer(
        RewardTrainer,
        config,
        model,
        "reward",
        quiet,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    dropped = len(train_ds) - len(trainer.train_dataset)
    if dropped and not quiet:
        console.print(
            f"[yellow]warning[/]: {dropped} pairs are longer than data.max_length={config.data.max_length} "
            "and were left out; raise data.max_length to keep them"
        )
    stats = TokenizeStats(examples=len(train_ds))
    # The adapter and its score head, under reward/ (what PPO, GRPO and `lmforge reward` load).
    return train_and_save(
        trainer, config, tokenizer, template, stats, eval_ds is not None, quiet, folder="reward"
    )
