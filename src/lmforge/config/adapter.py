"""`adapter:` — the parameter-efficient adapter trained on top of the frozen base."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section

PRESETS = ("minimal", "attention_only", "ffn_only", "all", "custom")
METHODS = ("lora", "dora", "adalora", "moe_dora", "fourierft", "vera", "ia3", "oft", "vision_lora", "none")
LAYERS = re.compile(r"^(?:(top|last):(\d+)|(\d+)-(\d+)|all|auto)$")
# Which methods train on a bitsandbytes-quantized base (tested on CPU). FourierFT has no
# quantized layer in peft; peft 0.21's 4-bit VeRA layer mixes dtypes and fails.
QUANTIZED_OK = ("lora", "dora", "adalora", "moe_dora", "ia3", "oft", "vision_lora")


class AdaLoraOptions(Section):
    """AdaLoRA's rank schedule (Zhang et al., 2023): ranks start at init_r and are pruned to
    adapter.r on average between tinit and total_steps - tfinal, every delta_t steps."""

    init_r: int = Field(12, gt=0, description="Starting rank of every adapted layer.")
    tinit: int = Field(0, ge=0, description="Steps of warm-up before any rank is pruned.")
    tfinal: int = Field(0, ge=0, description="Steps at the end with the final ranks fixed.")
    delta_t: int = Field(1, gt=0, description="Steps between two rank re-allocations.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser.")


class FourierFTOptions(Section):
    n_frequency: int = Field(1000, gt=0, description="Spectral coefficients learned per adapted matrix.")
    scaling: float = Field(150.0, gt=0, description="Scale of the inverse-DFT update (like LoRA's alpha).")


class MoeDoraOptions(Section):
    """MoE-DoRA: E DoRA experts per adapted layer, top-k routed per token (lmforge's own adapter)."""

    experts: int = Field(4, ge=2, description="DoRA experts per adapted linear layer.")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to (gates renormalised over them).")
    aux_loss_weight: float = Field(
        0.01, ge=0, description="Weight of the Switch-style load-balancing loss added to the training loss."
    )
    top_layers: int = Field(
        8, gt=0, description="With adapter.layers: auto, the number of top decoder layers adapted."
    )


class AdapterConfig(Section):
    method: Literal[
        "lora", "dora", "adalora", "moe_dora", "fourierft", "vera", "ia3", "oft", "vision_lora", "none"
    ] = Field(
        "lora",
        description="Adapter: lora, dora (weight-decomposed LoRA), adalora (adaptive rank), moe_dora "
        "(routed mixture of DoRA experts), fourierft, vera, ia3, oft, vision_lora (LoRA on a "
        "vision-language model's vision tower only); `none` trains no adapter (pre-training only).",
    )
    preset: Literal["minimal", "attention_only", "ffn_only", "all", "custom"] = Field(
        "all",
        description="Which modules: minimal (q,v), attention_only, ffn_only, all, custom (target_modules).",
    )
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names for preset `custom` (e.g. [q_proj, v_proj]).",
    )
    layers: str | list[int] = Field(
        "auto",
        description="Which layers: auto (all; moe_dora: the top moe_dora.top_layers), all, top:N or "
        "last:N (the last N), A-B (0-based, inclusive), or a list of indices (vision_lora: the vision "
        "tower's blocks).",
    )
    r: int = Field(8, gt=0, description="Rank (LoRA/DoRA/VeRA; AdaLoRA's average final rank; OFT's blocks).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) (stable at high rank).")
    init: Literal["default", "pissa"] = Field(
        "default",
        description="LoRA initialisation: default (B = 0), or pissa (A, B from the top singular vectors "
        "of each weight, the base keeps the residual; saved converted, so it loads on the original base).",
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B matrices learn at train.lr x this ratio (paper: 16)."
    )
    adalora: AdaLoraOptions = Field(default_factory=AdaLoraOptions, description="AdaLoRA schedule.")
    fourierft: FourierFTOptions = Field(default_factory=FourierFTOptions, description="FourierFT options.")
    moe_dora: MoeDoraOptions = Field(default_factory=MoeDoraOptions, description="MoE-DoRA options.")
    path: str | None = Field(
        None, description="Start from an existing adapter folder instead of a fresh one."
    )
    vision_parts: list[Literal["vision", "projector", "language"]] = Field(
        default_factory=lambda: ["vision"],
        description="vision_lora on a vision-language model: which parts get LoRA, any combination of "
        "vision (the vision tower's blocks), projector (the merger into the language model) and language "
        "(the language model's linear layers, by preset). Everything else stays frozen.",
    )

    @model_validator(mode="after")
    def _combinations(self) -> AdapterConfig:
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
        if isinstance(self.layers, str) and not LAYERS.match(self.layers.strip()):
            raise ValueError(
                f"adapter.layers `{self.layers}` is not understood: use all, top:8, last:4, 0-11 or a "
                "list such as [28, 29, 30, 31]"
            )
        if self.method == "ia3" and self.layers not in ("auto", "all"):
            raise ValueError(
                "adapter.method ia3 cannot be limited to some layers (peft's IA3 has no "
                "layers_to_transform); use adapter.layers: all"
            )
        lora_family = ("lora", "dora", "adalora", "moe_dora")
        if self.use_rslora and self.method not in lora_family:
            raise ValueError(f"adapter.use_rslora applies to lora/dora/adalora/moe_dora, not {self.method}")
        if self.moe_dora.top_k > self.moe_dora.experts:
            raise ValueError(
                f"adapter.moe_dora.top_k ({self.moe_dora.top_k}) is more than moe_dora.experts "
                f"({self.moe_dora.experts}): lower top_k or add experts"
            )
        if self.loraplus_lr_ratio is not None and self.method not in ("lora", "dora", "vision_lora"):
            raise ValueError(f"adapter.loraplus_lr_ratio applies to lora/dora, not {self.method}")
        if self.vision_parts != ["vision"] and self.method != "vision_lora":
            raise ValueError(f"adapter.vision_parts applies to method vision_lora, not {self.method}")
        if not self.vision_parts:
            raise ValueError("adapter.vision_parts is empty: name one or more of vision, projector, language")
        if self.init == "pissa" and self.method != "lora":
            raise ValueError(f"adapter.init pissa applies to method lora, not {self.method}")
        if self.init == "pissa" and self.path:
            raise ValueError(
                "adapter.init pissa starts a new adapter; it cannot be combined with adapter.path"
            )
        if self.method == "adalora" and self.adalora.init_r < self.r:
            raise ValueError(
                f"adapter.adalora.init_r ({self.adalora.init_r}) must be at least adapter.r ({self.r}), "
                "the average rank AdaLoRA prunes down to"
            )
        return self

    def layer_indices(self, num_layers: int) -> list[int] | None:
        """The decoder layers to adapt (None: all of them)."""
        if isinstance(self.layers, list):
            bad = [i for i in self.layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"adapter.layers {bad} out of range: the model has layers 0-{num_layers - 1}"
                )
            return sorted(set(self.layers))
        match = LAYERS.match(self.layers.strip())
        assert match is not None  # checked by the validator
        if self.layers.strip() == "auto" and self.method == "moe_dora":
            count = min(self.moe_dora.top_layers, num_layers)
            return list(range(num_layers - count, num_layers))
        if self.layers.strip() in ("all", "auto"):
            return None
        if match.group(1):
            count = int(match.group(2))
            if not 0 < count <= num_layers:
                raise ValueError(f"adapter.layers `{self.layers}`: the model has {num_layers} layers")
            return list(range(num_layers - count, num_layers))
        first, last = int(match.group(3)), int(match.group(4))
        if not 0 <= first <= last < num_layers:
            raise ValueError(f"adapter.layers `{self.layers}`: the model has layers 0-{num_layers - 1}")
        return list(range(first, last + 1))
