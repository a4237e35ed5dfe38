"""`data:` — training data, its format, the chat template and sequence length."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import Section


class DataConfig(Section):
    path: str = Field("", description="Training data: a .json (list of records) or .jsonl file.")
    format: Literal["auto", "alpaca", "messages", "text"] = Field(
        "auto",
        description="Record format: alpaca (instruction/input/output), messages (role/content), "
        "text (pre-training); auto detects it from the first record.",
    )
    template: str = Field(
        "auto",
        description="Chat template: llama2, mistral, chatml, qwen2.5, deepseek-r1, alpaca, plain; "
        "auto reads the one saved with the model, else chatml.",
    )
    system: str | None = Field(None, description="System prompt for records that have none.")
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer ones are truncated.")
    eval_path: str | None = Field(None, description="Separate evaluation file (same format).")
    eval_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the training data held out for evaluation."
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N records.")
