"""What every stage driver returns, and the template choice they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.data.templates import ChatTemplate, get_template, guess_template
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.loading import saved_template_name


@dataclass
class StageResult:
    output_dir: Path
    artifact: Path
    train_loss: float
    steps: int
    stats: TokenizeStats
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_template(config: RunConfig) -> ChatTemplate:
    """data.template, else the one saved with the model, else a guess from the model name."""
    name = config.data.template
    if name == "auto":
        name = saved_template_name(config.model.name_or_path) or guess_template(config.model.name_or_path)
    return get_template(name)
