"""`adapter:` — the parameter-efficient adapter trained on top of the frozen base."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section

PRESETS = ("minimal", "attention_only", "ffn_only", "all", "custom")


class AdapterConfig(Section):
    method: Literal["lora", "none"] = Field(
        "lora", description="Adapter type. `none` trains no adapter (pre-training only)."
    )
    preset: Literal["minimal", "attention_only", "ffn_only", "all", "custom"] = Field(
        "all",
        description="Where LoRA goes: minimal (q,v), attention_only, ffn_only, all, custom (target_modules).",
    )
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names for preset `custom` (e.g. [q_proj, v_proj]).",
    )
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    path: str | None = Field(
        None, description="Start from an existing adapter folder instead of a fresh one."
    )

    @model_validator(mode="after")
    def _custom_needs_targets(self) -> AdapterConfig:
        if self.preset == "custom" and not self.target_modules:
            raise ValueError(
                "adapter.preset is `custom` but adapter.target_modules is empty: "
                "list the module names, e.g. target_modules: [q_proj, v_proj]"
            )
        if self.preset != "custom" and self.target_modules:
            raise ValueError(
                f"adapter.target_modules is set but adapter.preset is `{self.preset}`: "
                "set preset: custom to use your own list"
            )
        return self
