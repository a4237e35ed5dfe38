"""`train.optimizer` and `train.optimizer_args`: which optimizer, and its own parameters.

Each optimizer has its own options section; `train.optimizer_args` is checked against the
chosen optimizer's section, so `betas` on Muon or `momentum` on Lion is an error that lists
what the optimizer does take, instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lmforge.config.base import Section

OptimizerName = Literal[
    "adamw",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "lion",
    "sophia",
    "muon",
    "sgd",
    "adamw_8bit",
    "paged_adamw_8bit",
]
# Optimizers that need a CUDA device (bitsandbytes' 8-bit and paged states).
CUDA_ONLY = ("adamw_8bit", "paged_adamw_8bit")


def _betas(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= beta < 1.0 for beta in value):
        raise ValueError(f"betas {list(value)} must each be in [0, 1)")
    return value


class AdamWArgs(Section):
    """AdamW (torch's; bitsandbytes' for the 8-bit and paged variants)."""

    betas: tuple[float, float] = Field((0.9, 0.999), description="Decay of the first and second moments.")
    eps: float = Field(1e-8, gt=0, description="Added to the denominator for stability.")

    _check_betas = field_validator("betas")(_betas)


class AdafactorArgs(Section):
    """torch.optim.Adafactor: factored second moments, no first moment (memory ~ AdamW's / 2)."""

    beta2_decay: float = Field(
        -0.8, le=0, description="Exponent of the second-moment decay schedule (beta2_t = 1 - t^decay)."
    )
    eps1: float | None = Field(
        None, gt=0, description="Floor of the second moment (None: the dtype's smallest step)."
    )
    eps2: float = Field(1e-3, gt=0, description="Floor of the parameter scale the update is relative to.")
    d: float = Field(1.0, ge=1, description="Clipping threshold of the update's RMS (torch requires >= 1).")


class LionArgs(Section):
    """Lion (lion-pytorch): the sign of an interpolated momentum. Use ~3-10x smaller lr and
    ~3-10x larger weight decay than AdamW."""

    betas: tuple[float, float] = Field(
        (0.9, 0.99), description="beta1 interpolates the update, beta2 decays the momentum."
    )

    _check_betas = field_validator("betas")(_betas)


class SophiaArgs(Section):
    """SophiaG: momentum preconditioned by a diagonal Gauss-Newton-Bartlett Hessian estimate,
    refreshed every `hessian_every` steps, with the per-coordinate update clipped to lr."""

    betas: tuple[float, float] = Field(
        (0.965, 0.99), description="Decay of the momentum and of the Hessian estimate."
    )
    rho: float = Field(0.04, gt=0, description="Scale of the Hessian in the denominator (the paper's gamma).")
    hessian_every: int = Field(10, gt=0, description="Re-estimate the Hessian every N optimizer steps.")
    eps: float = Field(1e-15, gt=0, description="Floor of the denominator.")

    _check_betas = field_validator("betas")(_betas)


class MuonArgs(Section):
    """torch.optim.Muon for the hidden weight matrices (momentum orthogonalised by Newton-Schulz);
    AdamW for embeddings, the output head, norms and biases, as Muon requires."""

    momentum: float = Field(0.95, ge=0, lt=1, description="Muon momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum.")
    ns_steps: int = Field(5, gt=0, description="Newton-Schulz iterations.")
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw",
        description="Per-matrix lr scaling: match_rms_adamw (0.2*sqrt(max(A,B)): one lr serves Muon and "
        "AdamW) or original (sqrt(max(1, A/B)): Muon lr ~0.02).",
    )
    adamw_lr: float | None = Field(None, gt=0, description="lr of the AdamW part (None: train.lr).")
    adamw_betas: tuple[float, float] = Field((0.9, 0.95), description="Betas of the AdamW part.")
    adamw_eps: float = Field(1e-8, gt=0, description="eps of the AdamW part.")

    _check_betas = field_validator("adamw_betas")(_betas)

    @model_validator(mode="after")
    def _adamw_lr_with_original_scaling(self) -> MuonArgs:
        if self.adjust_lr_fn == "original" and self.adamw_lr is None:
            raise ValueError(
                "adjust_lr_fn original takes Muon's own lr scale (train.lr ~0.02), far too high for the "
                "AdamW part: set adamw_lr (e.g. 3e-4), or use adjust_lr_fn match_rms_adamw"
            )
        return self


class SgdArgs(Section):
    """torch.optim.SGD."""

    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")


OPTIMIZER_ARGS: dict[str, type[Section]] = {
    "adamw": AdamWArgs,
    "adamw_torch": AdamWArgs,
    "adamw_torch_fused": AdamWArgs,
    "adamw_8bit": AdamWArgs,
    "paged_adamw_8bit": AdamWArgs,
    "adafactor": AdafactorArgs,
    "lion": LionArgs,
    "sophia": SophiaArgs,
    "muon": MuonArgs,
    "sgd": SgdArgs,
}


def optimizer_args(name: str, args: dict[str, Any]) -> Section:
    """`args` checked against optimizer `name`'s options (ValueError naming the key and the options)."""
    model = OPTIMIZER_ARGS[name]
    known = list(model.model_fields)
    for key in args:
        if key not in known:
            from lmforge.config.base import closest

            hint = closest(key, known)
            did_you_mean = f" (did you mean `{hint}`?)" if hint else ""
            raise ValueError(
                f"train.optimizer_args.{key} is not an option of optimizer {name}{did_you_mean}; "
                f"its options: {', '.join(known)}"
            )
    try:
        parsed = model.model_validate(args)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise ValueError(f"train.optimizer_args{'.' + where if where else ''}: {message}") from None
    if isinstance(parsed, SgdArgs) and parsed.nesterov and parsed.momentum == 0:
        raise ValueError("train.optimizer_args.nesterov needs momentum > 0")
    return parsed
