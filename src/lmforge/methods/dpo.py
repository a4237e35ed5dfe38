"""Preference pairs -> an adapter: DPO (trl's DPOTrainer), ORPO and SimPO (trl.experimental).

DPO (Rafailov et al., 2023) with `method.loss_type`: sigmoid (the paper's), ipo (Azar et al.,
2023), hinge (SLiC, Zhao et al., 2023), robust (Chowdhury et al., 2024, with label_smoothing as
the flip rate); `sft_weight` adds trl's `sft` loss (NLL on the chosen answer) with that weight.
The reference is the model the stage starts from (see `training/preference.py`): the base for a
fresh adapter, base + the SFT adapter when continuing one (`adapter.path`), never the bare base.
ORPO and SimPO need no reference model.

Top to bottom: config -> tokenizer and template -> pairs -> model + adapter -> trainer -> train
(resuming from the latest complete checkpoint when asked) -> save the adapter.
"""

from __future__ import annotations

from rich.console import Console
from trl import DPOConfig, DPOTrainer

from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.loading import load_tokenizer
from lmforge.training import trl_experimental
from lmforge.training.compat import pending_metrics
from lmforge.training.preference import MoeAuxLoss, pair_dataset, policy_model, use_template
from lmforge.training.stage import StageResult, begin_stage, optimizer_steps, resolve_template, train_and_save
from lmforge.training.trainer import common_arguments, stage_trainer

console = Console(stderr=True)
METHODS = ("dpo", "orpo", "simpo")


class ForgeDPOTrainer(MoeAuxLoss, DPOTrainer):
    """trl's DPOTrainer, plus MoE-DoRA's load-balancing loss when that is the adapter.

    Logs the mean log-ratios log pi/pi_ref of the chosen and rejected answers (`logratio/chosen`,
    `logratio/rejected`): trl's rewards divided by beta, so comparable across betas. On the
    chosen answers this is a sample estimate of how far the policy moved from the reference.
    """

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        metrics = pending_metrics(self, "train" if self.model.training else "eval")
        for side in ("chosen", "rejected"):
            if metrics.get(f"rewards/{side}"):
                metrics[f"logratio/{side}"] = [r / self.beta for r in metrics[f"rewards/{side}"]]
        super().log(logs, start_time)


def check(config: RunConfig) -> None:
    """This stage's own combinations, checked before anything is loaded."""
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"methods.dpo runs {', '.join(METHODS)}, not method.name={name}")
    if config.adapter.method == "none":
        raise ValueError(
            f"{name} trains an adapter (no full fine-tuning in post-training): set adapter.method, e.g. lora"
        )
    if config.data.streaming:
        raise ValueError(f"{name} reads the whole preference data set; turn off data.streaming")
    if config.data.packing:
        raise ValueError(f"data.packing does not apply to preference pairs ({name}); turn it off")


def dpo_arguments(config: RunConfig, has_eval: bool, hardware) -> DPOConfig:
    method = config.method
    losses, weights = [method.loss_type], [1.0]
    if method.sft_weight > 0:
        losses, weights = [*losses, "sft"], [*weights, method.sft_weight]
    # MoE-DoRA is not peft's: trl cannot disable it to get the reference, so precompute it.
    precompute = method.precompute_ref or config.adapter.method == "moe_dora"
    return DPOConfig(
        **common_arguments(config.train, hardware, has_eval),
        include_num_input_tokens_seen="non_padding",
        loss_type=losses,
        loss_weights=weights,
        beta=method.preference_beta,
        label_smoothing=method.label_smoothing,
        precompute_ref_log_probs=precompute,
        max_length=config.data.max_length,
    )


def build_trainer(config: RunConfig, model, tokenizer, hardware, train_ds, eval_ds, quiet: bool, peft=None):
    name, length, has_eval = config.method.name, config.data.max_length, eval_ds is not None
    arguments = common_arguments(config.train, hardware, has_eval)
    if name == "dpo":
        trainer_class, args = ForgeDPOTrainer, dpo_arguments(config, has_eval, hardware)
    elif name == "orpo":
        trainer_class, args = trl_experimental.orpo(config.method, arguments, length)
    else:
        trainer_class, args = trl_experimental.simpo(config.method, arguments, length)
    return stage_trainer(
        trainer_class,
        config,
        model,
        name,
        quiet,
        args=args,
        peft_config=peft,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    use_template(tokenizer, template)
    data = load_examples(config.data, "preference")
    train_ds = pair_dataset(data.train, config.method.name)
    eval_ds = pair_dataset(data.eval, config.method.name) if data.eval else None
    if not quiet:
        console.print(f"[bold]preference pairs[/]: {len(train_ds)} train, {len(data.eval)} held out")

    model, hardware, peft = policy_model(config, quiet, optimizer_steps(config, len(train_ds)))
    trainer = build_trainer(config, model, tokenizer, hardware, train_ds, eval_ds, quiet, peft)
    stats = TokenizeStats(examples=len(train_ds))
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
