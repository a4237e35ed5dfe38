"""DPO-family losses on sequence log-probs, for the stages trl's DPOTrainer cannot run here.

Text DPO goes through trl's DPOTrainer (its `loss_type`). Image-text DPO for vision-language models
needs a processor trl builds from the model's video processor too, which is not always installable,
so lmforge computes the same losses itself, with trl's definitions (trl 1.16.0,
`DPOTrainer._compute_loss`), from answer log-probs summed over each answer's tokens:

    r_w = log pi(y_w) - log pi_ref(y_w),  r_l = log pi(y_l) - log pi_ref(y_l),  h = beta * (r_w - r_l)

- sigmoid (Rafailov et al., 2023): -log sigmoid(h)
- robust (Chowdhury et al., 2024), flip rate e: ((1 - e) (-log sigmoid(h)) - e (-log sigmoid(-h))) / (1 - 2e)
- hinge (SLiC, Zhao et al., 2023): relu(1 - h)
- ipo (Azar et al., 2023, Eq. 17): (r_w / |y_w| - r_l / |y_l| - 1 / (2 beta))^2, each log-ratio
  divided by its answer's token count. The paper writes sequence log-ratios; trl divides by length
  (confirmed with the IPO authors, its comment says: the paper's results use this form), so the
  squared loss does not grow with answer length and one beta suits short and long answers.

The implicit rewards are beta * (log pi - log pi_ref) of each answer (summed, for every loss type),
as trl logs them.
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
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from summed answer log-probs (shape B);
    ipo also needs each answer's token count (`answer_tokens`)."""
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
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(
                "ipo averages each answer's log-ratio over its tokens: pass chosen_tokens, rejected_tokens"
            )
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: sigmoid, robust, hinge or ipo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed log-probs of each row's labelled tokens (labels aligned with inputs; shifted here)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != ignore_index
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(-1)


def answer_tokens(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """How many labelled tokens each row's answer has (the tokens `answer_logps` sums over)."""
    return (labels[:, 1:] != ignore_index).sum(-1)
