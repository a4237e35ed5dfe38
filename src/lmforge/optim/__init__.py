"""The optimizers transformers' Trainer does not build itself: `build_optimizer(train, model)`.

AdamW and its 8-bit variants come from the Trainer (`build_optimizer` returns None for them); the
others are built here over the model's trainable parameters, with decoupled weight decay on
matrices only and every group at `train.lr` (so the Trainer's LR schedulers scale them all).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from lmforge.config.optim import AdafactorArgs, LionArgs, MuonArgs, SgdArgs, SophiaArgs
from lmforge.config.train import TrainConfig
from lmforge.optim.groups import decay_groups, trainable
from lmforge.optim.muon import MuonWithAdamW, split_muon_params
from lmforge.optim.sophia import SophiaG, estimate_hessian

__all__ = [
    "TRAINER_BUILT",
    "MuonWithAdamW",
    "SophiaG",
    "build_optimizer",
    "estimate_hessian",
    "split_muon_params",
]

# Optimizers transformers' Trainer builds from TrainingArguments.optim.
TRAINER_BUILT = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit")


def build_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer | None:
    """`train.optimizer` over `model`'s trainable parameters; None for those the Trainer builds."""
    name = train.optimizer
    if name in TRAINER_BUILT:
        return None
    if not trainable(model):
        raise ValueError(f"train.optimizer {name}: the model has no trainable parameters")
    options = train.optimizer_options
    lr, weight_decay = train.lr, train.weight_decay
    if name == "muon":
        muon = cast(MuonArgs, options)
        return MuonWithAdamW(
            model,
            lr=lr,
            weight_decay=weight_decay,
            momentum=muon.momentum,
            nesterov=muon.nesterov,
            ns_steps=muon.ns_steps,
            adjust_lr_fn=muon.adjust_lr_fn,
            adamw_lr=muon.adamw_lr,
            adamw_betas=muon.adamw_betas,
            adamw_eps=muon.adamw_eps,
        )
    groups = decay_groups(trainable(model), lr, weight_decay)
    if name == "lion":
        from lion_pytorch import Lion  # only runs that pick Lion need the package loaded

        lion = cast(LionArgs, options)
        return Lion(groups, lr=lr, betas=lion.betas, weight_decay=weight_decay)
    if name == "sophia":
        sophia = cast(SophiaArgs, options)
        return SophiaG(
            groups,
            lr=lr,
            betas=sophia.betas,
            rho=sophia.rho,
            weight_decay=weight_decay,
            eps=sophia.eps,
            hessian_every=sophia.hessian_every,
        )
    if name == "adafactor":
        adafactor = cast(AdafactorArgs, options)
        return torch.optim.Adafactor(
            groups,
            lr=lr,
            beta2_decay=adafactor.beta2_decay,
            eps=(adafactor.eps1, adafactor.eps2),
            d=adafactor.d,
            weight_decay=weight_decay,
        )
    if name == "sgd":
        sgd = cast(SgdArgs, options)
        # torch's SGD adds weight_decay * p to the gradient (L2): the same as decoupled decay
        # without momentum; with momentum the decay goes through the momentum buffer too.
        return torch.optim.SGD(
            groups, lr=lr, momentum=sgd.momentum, nesterov=sgd.nesterov, weight_decay=weight_decay
        )
    raise ValueError(f"train.optimizer {name} has no builder")
