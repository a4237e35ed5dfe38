"""Parameter groups: decoupled weight decay on matrices only, every group at the run's lr."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`model`'s parameters that require grad, in `named_parameters` order (tied weights once)."""
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def decay_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Groups of `named`: matrices (ndim >= 2) decay by `weight_decay`, the rest (norms, biases) not.

    Norm gains and biases are few and have no scale to keep in check, so decaying them only
    pulls norms towards 0. Empty groups are left out; the order of each group follows `named`.
    Every group carries its own "lr", which LR schedulers take as the group's initial lr.
    """
    named = list(named)
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
