"""Distillation losses against their formulas, computed by hand on a 2x3 example."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.kd import distillation_loss, kd_divergence

STUDENT = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
TEACHER = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def expected(kind: str, t: float = 1.0, beta: float = 0.5) -> list[float]:
    out = []
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        ps, pt = softmax(s_row, t), softmax(t_row, t)
        if kind == "forward_kl":
            value = kl(pt, ps)
        elif kind == "reverse_kl":
            value = kl(ps, pt)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=True)]
            value = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
        out.append(value * t * t)
    return out


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(("t", "beta"), [(1.0, 0.5), (2.0, 0.5), (1.0, 0.2)])
def test_divergences_match_their_formulas(kind, t, beta):
    got = kd_divergence(STUDENT, TEACHER, kind, t, beta)
    torch.testing.assert_close(got, torch.tensor(expected(kind, t, beta)), atol=1e-6, rtol=1e-6)


def test_identical_distributions_cost_nothing_and_jsd_is_symmetric_at_half():
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_divergence(STUDENT, STUDENT, kind).abs().max() < 1e-6
    forward = kd_divergence(STUDENT, TEACHER, "jsd", beta=0.5)
    backward = kd_divergence(TEACHER, STUDENT, "jsd", beta=0.5)
    torch.testing.assert_close(forward, backward)
    assert not torch.allclose(
        kd_divergence(STUDENT, TEACHER, "forward_kl"), kd_divergence(STUDENT, TEACHER, "reverse_kl")
    )


def test_mixed_loss_counts_only_labelled_positions():
    """alpha x divergence + (1 - alpha) x cross-entropy, averaged over labels != -100."""
    student = torch.stack([STUDENT, STUDENT])  # (batch 2, positions 2, vocab 3)
    teacher = torch.stack([TEACHER, TEACHER])
    labels = torch.tensor([[0, -100], [-100, 1]])
    loss, parts = distillation_loss(student, teacher, labels, "forward_kl", temperature=2.0, alpha=0.25)
    kd = expected("forward_kl", 2.0)
    ce = [-math.log(softmax(STUDENT[0].tolist())[0]), -math.log(softmax(STUDENT[1].tolist())[1])]
    want = sum(0.25 * k + 0.75 * c for k, c in zip(kd, ce, strict=True)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["kd_loss"] == pytest.approx(sum(kd) / 2, rel=1e-6)
    assert parts["ce_loss"] == pytest.approx(sum(ce) / 2, rel=1e-6)
    # with num_items (the accumulated batch's label count) it is the sum over that count
    summed, _ = distillation_loss(
        student, teacher, labels, "forward_kl", temperature=2.0, alpha=0.25, num_items=8
    )
    assert summed.item() == pytest.approx(want * 2 / 8, rel=1e-6)


def test_gradient_of_forward_kl_at_t1_is_student_minus_teacher_probs():
    """d KL(p_T || softmax(z)) / dz = softmax(z) - p_T: the student moves toward the teacher."""
    student = STUDENT.clone().requires_grad_(True)
    kd_divergence(student, TEACHER, "forward_kl").sum().backward()
    want = torch.softmax(STUDENT, -1) - torch.softmax(TEACHER, -1)
    torch.testing.assert_close(student.grad, want, atol=1e-6, rtol=1e-6)
