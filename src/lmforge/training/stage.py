"""What every stage driver returns, and the template choice they share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lmforge.adapters.build import attach_adapter
from lmforge.artifacts import save_artifact
from lmforge.config import RunConfig
from lmforge.data.templates import AnyTemplate, pick_template
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.hardware import Hardware, choose_hardware
from lmforge.models.loading import count_parameters, load_causal_lm, saved_template_name
from lmforge.training.checkpoints import resolve_resume

console = Console(stderr=True)


@dataclass
class StageResult:
    output_dir: Path
    artifact: Path
    train_loss: float
    steps: int
    stats: TokenizeStats
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_template(config: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> AnyTemplate:
    """data.template; `auto` resolves as every command does (`data.templates.pick_template`)."""
    return template_for(config.data.template, config.model.name_or_path, tokenizer)


def template_for(
    name: str, model_name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> AnyTemplate:
    """The template `name`; `auto` resolves as every command does (`data.templates.pick_template`)."""
    return pick_template(name, [saved_template_name(model_name_or_path)], tokenizer, model_name_or_path)


def load_model_for_training(
    config: RunConfig,
    quiet: bool = False,
    total_steps: int | None = None,
    reward: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, Hardware]:
    """Seeded model load plus the configured adapter; prints trainable / total parameters.

    `total_steps` (the optimizer steps the run will take) is needed by AdaLoRA's rank schedule.
    `reward=True` loads a one-output sequence classifier (the reward model's backbone + head).
    With `model.arch` the model is built new from the lab architecture (its `tokenizer` given).
    """
    set_seed(config.train.seed)  # adapter (and reward head) initialisation must be reproducible too
    if config.model.arch:
        from lmforge.lab.build import new_model

        assert tokenizer is not None, "model.arch needs the architecture's tokenizer"
        hardware = choose_hardware(config.model)
        if not quiet:
            console.print(f"[bold]hardware[/]: {hardware.describe()}")
        model = new_model(config.model.arch, tokenizer, hardware.attn_implementation).to(hardware.device)
        model.config.use_cache = False
    else:
        model, hardware = load_causal_lm(config.model, for_training=True, quiet=quiet, reward=reward)
    if config.adapter.method != "none":
        model = attach_adapter(
            model,
            config.adapter,
            config.train.gradient_checkpointing,
            total_steps,
            pissa_init_dir(config),
            task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        )
    trainable, total = count_parameters(model)
    if not quiet:
        share = 100 * trainable / max(total, 1)
        console.print(f"[bold]parameters[/]: {trainable:,} trainable / {total:,} total ({share:.3f}%)")
    return model, hardware


def train_and_save(
    trainer,
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    stats: TokenizeStats,
    evaluate: bool,
    quiet: bool = False,
    card_extra: str = "",
    image_processor=None,
) -> StageResult:
    """The end every trainer-based driver shares: resume from the latest complete checkpoint
    (`train.resume`), train, evaluate when there is evaluation data, save the adapter (or the
    whole model when adapter.method is none) with tokenizer, template and card."""
    output_dir = Path(config.train.output_dir)
    resume = resolve_resume(output_dir, config.train.resume)
    if resume and not quiet:
        console.print(f"[bold]resuming[/] from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if evaluate:
        metrics.update(trainer.evaluate())
    kind = "adapter" if config.adapter.method != "none" else "model"
    artifact = save_artifact(
        trainer.model, tokenizer, template, output_dir / kind, kind, config, card_extra, image_processor
    )
    if not quiet:
        console.print(f"[bold green]saved[/] {kind} to {artifact}")
    return StageResult(output_dir, artifact, result.training_loss, result.global_step, stats, metrics)


def optimizer_steps(config: RunConfig, examples: int) -> int:
    """How many optimizer steps the run takes: train.max_steps, or epochs over `examples`."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    per_epoch = max(1, math.ceil(examples / (config.train.batch_size * config.train.grad_accum)))
    return max(1, math.ceil(per_epoch * config.train.epochs))


def pissa_init_dir(config: RunConfig) -> Path:
    """Where a PiSSA run keeps its initial adapter (needed to convert the final one)."""
    return Path(config.train.output_dir) / "pissa_init"
