"""DPO-family losses on sequence log-probs, for the stages trl's DPOTrainer cannot run here.

Text DPO goes through trl's DPOTrainer (its `loss_type`). Image-text DPO for vision-language models
needs a processor trl builds from the model's video processor too, which is not always installable,
so lmforge computes the same losses itself from summed answer log-probs:

    h = beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)))

- sigmoid (Rafailov et al., 2023): -log sigmoid(h)
- robust (Chowdhury et al., 2024), flip rate e: ((1 - e) (-log sigmoid(h)) - e (-log sigmoid(-h))) / (1 - 2e)
- hinge (SLiC, Zhao et al., 2023): relu(1 - h)
- ipo (Azar et al., 2023): (h / beta - 1 / (2 beta))^2

The implicit rewards are beta * (log pi - log pi_ref) of each answer. trl computes the same values
(its ipo normalises by length only with `ld_alpha`; this one uses the summed log-probs, as trl's
default does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed answer log-probs (shape B)."""
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    h = beta * margin
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(h)
    elif loss_type == "robust":
        e = label_smoothing
        losses = ((1 - e) * -F.logsigmoid(h) - e * -F.logsigmoid(-h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: sigmoid, robust, hinge or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed log-probs of each row's labelled tokens (labels aligned with inputs; shifted here)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != ignore_index
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(-1)
