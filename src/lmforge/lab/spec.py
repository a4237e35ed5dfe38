"""The architecture YAML of `lmforge lab build`: which components, what sizes.

Every choice is checked with its reason before anything is built: sizes that do not divide,
RoPE options on a model without RoPE, YaRN without its original context length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from lmforge.config.base import Section
from lmforge.config.loader import strict_yaml

POSITIONS = ("sinusoidal", "rope", "alibi", "yarn")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "leaky_relu", "silu", "swiglu")


class YarnSpec(Section):
    """YaRN: RoPE whose frequencies are interpolated for a longer context than it was trained on."""

    factor: float = Field(4.0, gt=1.0, description="Context extension factor (new length / original).")
    original_max_position_embeddings: int = Field(
        ..., gt=0, description="The context length RoPE was (or will be) trained at."
    )
    beta_fast: float = Field(32.0, gt=0, description="Rotations above which dimensions are extrapolated.")
    beta_slow: float = Field(1.0, gt=0, description="Rotations below which dimensions are interpolated.")


class ArchSpec(Section):
    """A decoder-only transformer assembled from components (pre-norm residual blocks)."""

    name: str = Field("lab-model", description="A name for the model (written to its model card).")
    tokenizer: str = Field(
        ..., description="Tokenizer folder or hub id; the vocabulary size and special tokens come from it."
    )
    d_model: int = Field(256, gt=0, description="Hidden size.")
    n_layers: int = Field(4, gt=0, description="Transformer blocks.")
    n_heads: int = Field(4, gt=0, description="Query heads.")
    n_kv_heads: int | None = Field(
        None,
        gt=0,
        description="Key/value heads: n_heads (or unset) = multi-head, 1 = multi-query, between = "
        "grouped-query.",
    )
    d_ff: int | None = Field(
        None,
        gt=0,
        description="Feed-forward width (unset: 4 x d_model, or 8/3 x d_model rounded up to a multiple of "
        "8 for swiglu, which has three matrices instead of two).",
    )
    activation: Literal["relu", "gelu", "leaky_relu", "silu", "swiglu"] = Field(
        "swiglu", description="Feed-forward activation (swiglu: silu(gate) x up, as LLaMA)."
    )
    leaky_relu_slope: float = Field(0.01, gt=0, lt=1, description="Negative slope of leaky_relu.")
    norm: Literal["layernorm", "rmsnorm"] = Field("rmsnorm", description="Normalisation before each block.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the norms.")
    position: Literal["sinusoidal", "rope", "alibi", "yarn"] = Field(
        "rope",
        description="Positional encoding: sinusoidal (added to the embeddings), rope (rotary), alibi "
        "(linear attention bias per head), yarn (rotary with YaRN scaling for a longer context).",
    )
    rope_theta: float | None = Field(
        None, gt=0, description="RoPE/YaRN base wavelength (unset: 10000). Only for rope and yarn."
    )
    yarn: YarnSpec | None = Field(None, description="YaRN scaling; required by (and only for) position yarn.")
    max_position_embeddings: int = Field(
        2048, gt=0, description="Longest context the model is meant for (for yarn: the extended length)."
    )
    tie_embeddings: bool = Field(True, description="Share the input embedding and output head weights.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the embeddings and residual branches.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the attention weights.")
    bias: bool = Field(False, description="Biases in the linear layers and LayerNorm.")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the initial weights.")
    seed: int = Field(0, description="Seed of the initial weights.")

    @model_validator(mode="after")
    def _consistent(self) -> ArchSpec:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}: every head gets "
                "d_model / n_heads dimensions; change one of them"
            )
        kv = self.kv_heads
        if kv > self.n_heads or self.n_heads % kv:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {kv}: each key/value head serves "
                "an equal group of query heads; use a divisor of n_heads (1 = multi-query)"
            )
        rotary = self.position in ("rope", "yarn")
        if rotary and self.head_dim % 2:
            raise ValueError(
                f"head dimension {self.head_dim} (d_model / n_heads) is odd: RoPE rotates pairs of "
                "dimensions; make d_model / n_heads even"
            )
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"d_model {self.d_model} is odd: sinusoidal encodings pair sin and cos; make it even"
            )
        if self.rope_theta is not None and not rotary:
            raise ValueError(
                f"rope_theta applies to position rope or yarn, not {self.position}; remove it "
                f"({self.position} has no rotary frequencies)"
            )
        if self.position == "yarn" and self.yarn is None:
            raise ValueError(
                "position yarn needs a `yarn:` section with original_max_position_embeddings "
                "(and factor, default 4)"
            )
        if self.yarn is not None and self.position != "yarn":
            raise ValueError(f"the `yarn:` section applies to position yarn, not {self.position}; remove it")
        if (
            self.yarn is not None
            and self.yarn.original_max_position_embeddings >= self.max_position_embeddings
        ):
            raise ValueError(
                f"yarn.original_max_position_embeddings {self.yarn.original_max_position_embeddings} must be "
                f"below max_position_embeddings {self.max_position_embeddings}: YaRN extends a shorter "
                "context"
            )
        if self.activation != "leaky_relu" and self.leaky_relu_slope != 0.01:
            raise ValueError(f"leaky_relu_slope applies to activation leaky_relu, not {self.activation}")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 8 * math.ceil(8 * self.d_model / 3 / 8)
        return 4 * self.d_model

    @property
    def attention_kind(self) -> str:
        kv = self.kv_heads
        return "multi-head" if kv == self.n_heads else "multi-query" if kv == 1 else "grouped-query"


def load_arch(path: str | Path) -> ArchSpec:
    """The architecture YAML at `path`, validated (ValueError naming the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture file {path} does not exist")
    try:
        raw = strict_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must be a mapping of architecture keys (d_model: 256, …)")
    try:
        return ArchSpec.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: {arch_error(exc)}") from None


def arch_error(exc: ValidationError) -> str:
    """One line for the first problem, with a did-you-mean for an unknown key."""
    from lmforge.config.base import closest

    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        hint = closest(str(error["loc"][-1]), list(ArchSpec.model_fields))
        return f"unknown key `{where}`" + (f" (did you mean `{hint}`?)" if hint else "")
    if error["type"] == "missing":
        return (
            f"`{where}` is required ({ArchSpec.model_fields[where].description})"
            if where in ArchSpec.model_fields
            else f"`{where}` is required"
        )
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
