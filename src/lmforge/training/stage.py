"""What every stage driver returns, and the template choice they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel, set_seed

from lmforge.adapters.lora import attach_lora
from lmforge.config import RunConfig
from lmforge.data.templates import AnyTemplate, get_template, guess_template
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.hardware import Hardware
from lmforge.models.loading import count_parameters, load_causal_lm, saved_template_name

console = Console(stderr=True)


@dataclass
class StageResult:
    output_dir: Path
    artifact: Path
    train_loss: float
    steps: int
    stats: TokenizeStats
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_template(config: RunConfig) -> AnyTemplate:
    """data.template, else the one saved with the model, else a guess from the model name."""
    name = config.data.template
    if name == "auto":
        name = saved_template_name(config.model.name_or_path) or guess_template(config.model.name_or_path)
    return get_template(name)


def load_model_for_training(config: RunConfig, quiet: bool = False) -> tuple[PreTrainedModel, Hardware]:
    """Seeded model load plus the configured adapter; prints trainable / total parameters."""
    set_seed(config.train.seed)  # adapter initialisation must be reproducible too
    model, hardware = load_causal_lm(config.model, for_training=True, quiet=quiet)
    if config.adapter.method == "lora":
        model = attach_lora(model, config.adapter, config.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    if not quiet:
        share = 100 * trainable / max(total, 1)
        console.print(f"[bold]parameters[/]: {trainable:,} trainable / {total:,} total ({share:.3f}%)")
    return model, hardware
