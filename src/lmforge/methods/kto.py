"""Unpaired good/bad answers -> an adapter: KTO (Ethayarajh et al., 2024) through trl's KTOTrainer.

Records carry a boolean `label` (desirable or not). Preference pairs are accepted too: each pair
becomes one desirable example (the chosen answer) and one undesirable one (the rejected answer).
`desirable_weight` / `undesirable_weight` rebalance the two kinds (the paper keeps
weight x count roughly equal between them). The reference is the starting model, as for DPO.

trl estimates KTO's KL term from mismatched completions within a batch, which needs a fixed batch
order: the examples are shuffled once with `train.seed`, then read in order, at least two per batch.
"""

from __future__ import annotations

import itertools

from rich.console import Console
from trl import KTOConfig, KTOTrainer

from lmforge.config import RunConfig
from lmforge.data.loader import iter_examples, load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.loading import is_vision_language, load_tokenizer
from lmforge.training.preference import MoeAuxLoss, kto_dataset, kto_from_pairs, policy_model, use_template
from lmforge.training.stage import StageResult, begin_stage, optimizer_steps, resolve_template, train_and_save
from lmforge.training.trainer import common_arguments, stage_trainer

console = Console(stderr=True)


class ForgeKTOTrainer(MoeAuxLoss, KTOTrainer):
    """trl's KTOTrainer, plus MoE-DoRA's load-balancing loss when that is the adapter."""


def check(config: RunConfig) -> None:
    if config.method.name != "kto":
        raise ValueError(f"methods.kto cannot run method.name={config.method.name}")
    if config.adapter.method == "none":
        raise ValueError("kto trains an adapter (no full fine-tuning in post-training): set adapter.method")
    if config.train.batch_size < 2:
        raise ValueError(
            "kto needs train.batch_size >= 2: its KL estimate pairs each example with another in the batch"
        )
    if config.data.streaming or config.data.packing:
        raise ValueError("kto reads the whole data set unpacked; turn off data.streaming and data.packing")
    if is_vision_language(config.model):
        raise ValueError(
            "kto on a vision-language model is not available; image-text preference training runs with "
            "method.name: dpo"
        )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    use_template(tokenizer, template)
    first = next(itertools.islice(iter_examples(config.data, "kto"), 1), None)
    pairs = first is not None and first.kind == "preference"
    data = load_examples(config.data, "preference" if pairs else "kto")
    train = kto_from_pairs(data.train) if pairs else data.train
    held_out = kto_from_pairs(data.eval) if pairs else data.eval
    train_ds = kto_dataset(train).shuffle(seed=config.train.seed)
    eval_ds = kto_dataset(held_out) if held_out else None
    if not quiet:
        good = sum(e.label for e in train)
        console.print(f"[bold]kto examples[/]: {good} desirable, {len(train) - good} undesirable")

    model, hardware, peft = policy_model(config, quiet, optimizer_steps(config, len(train_ds)))
    method = config.method
    args = KTOConfig(
        **common_arguments(config.train, hardware, eval_ds is not None),
        train_sampling_strategy="sequential",
        beta=method.preference_beta,
        desirable_weight=method.desirable_weight,
        undesirable_weight=method.undesirable_weight,
        precompute_ref_log_probs=method.precompute_ref or config.adapter.method == "moe_dora",
        max_length=config.data.max_length,
    )
    trainer = stage_trainer(
        ForgeKTOTrainer,
        config,
        model,
        "kto",
        quiet,
        args=args,
        peft_config=peft,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    stats = TokenizeStats(examples=len(train_ds))
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
