"""Knowledge-distillation losses: token distributions of a teacher taught to a student.

Pure functions on logits of the positions to learn (already selected and shifted): logits in,
a scalar loss out, averaged over those positions (or summed, for exact gradient accumulation).

- forward KL, KL(p_T || p_S): Hinton et al. (2015), the student covers all the teacher's mass
  (mean-seeking);
- reverse KL, KL(p_S || p_T): mode-seeking, used for generative students (MiniLLM, Gu et al. 2024);
- generalized Jensen-Shannon, beta·KL(p_T || m) + (1 - beta)·KL(p_S || m) with
  m = beta·p_T + (1 - beta)·p_S: GKD (Agarwal et al. 2024); beta = 0.5 is the symmetric JSD.

Both distributions are softened by the temperature T and the divergence is multiplied by T^2, so
its gradients keep their scale as T changes (Hinton et al.). Written here rather than taken from
trl because trl's distillation trainers live in `trl.experimental` (unstable API) and bring
on-policy sampling this stage does not use; the formulas are small and tested against hand
computations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence (shape: logits' leading dims), times T^2."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        divergence = _kl(teacher, student)
    elif kind == "reverse_kl":
        divergence = _kl(student, teacher)
    elif kind == "jsd":
        mixture = torch.logsumexp(
            torch.stack((teacher + math.log(beta), student + math.log(1 - beta))), dim=0
        )
        divergence = beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}: use forward_kl, reverse_kl or jsd")
    return divergence * temperature**2


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities (0·log 0 taken as 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.5,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """alpha x divergence + (1 - alpha) x cross-entropy on the hard labels, over the positions whose
    label is not -100 (logits and labels aligned: logits[i] predicts labels[i]).

    Averaged over those positions, or summed and divided by `num_items` (the label tokens of the
    whole accumulated batch) so gradient accumulation gives the full batch's mean exactly.
    Returns the loss and the two parts (per-position means) for logging.
    """
    mask = labels != -100
    student, teacher, targets = student_logits[mask], teacher_logits[mask], labels[mask]
    divergence = kd_divergence(student, teacher, kind, temperature, beta)
    cross_entropy = F.cross_entropy(student.float(), targets, reduction="none")
    per_position = alpha * divergence + (1 - alpha) * cross_entropy
    denominator = num_items if num_items is not None else max(int(mask.sum()), 1)
    loss = per_position.sum() / denominator
    count = max(int(mask.sum()), 1)
    parts = {"kd_loss": divergence.sum().item() / count, "ce_loss": cross_entropy.sum().item() / count}
    return loss, parts
