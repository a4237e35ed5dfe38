"""`method:` — which training stage to run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import Section


class MethodConfig(Section):
    name: Literal["sft", "pretrain"] = Field(
        "sft",
        description="Stage: sft (supervised fine-tuning) or pretrain (causal LM on raw text).",
    )
