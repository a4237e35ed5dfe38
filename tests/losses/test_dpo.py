"""DPO-family losses against their formulas on hand-computed log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.dpo import answer_logps, dpo_loss

# Two pairs. Pair 0: the policy moved +1 on chosen and -1 on rejected (margin 2); pair 1: margin -0.5.
CHOSEN = torch.tensor([-3.0, -5.0])
REJECTED = torch.tensor([-6.0, -4.0])
REF_CHOSEN = torch.tensor([-4.0, -5.0])
REF_REJECTED = torch.tensor([-5.0, -4.5])


def sigmoid_loss(h: float) -> float:
    return math.log(1 + math.exp(-h))


@pytest.mark.parametrize(
    ("loss_type", "beta", "smoothing", "expected"),
    [
        ("sigmoid", 0.5, 0.0, [sigmoid_loss(1.0), sigmoid_loss(-0.25)]),
        ("hinge", 0.5, 0.0, [0.0, 1.25]),
        ("ipo", 0.5, 0.0, [(2 - 1) ** 2, (-0.5 - 1) ** 2]),
        (
            "robust",
            0.5,
            0.2,
            [
                (0.8 * sigmoid_loss(1.0) - 0.2 * sigmoid_loss(-1.0)) / 0.6,
                (0.8 * sigmoid_loss(-0.25) - 0.2 * sigmoid_loss(0.25)) / 0.6,
            ],
        ),
    ],
)
def test_losses_match_their_formulas(loss_type, beta, smoothing, expected):
    losses, chosen, rejected = dpo_loss(
        CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta, loss_type, smoothing
    )
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.25])


def test_zero_margin_gives_the_known_starting_values():
    same = torch.tensor([-2.0])
    assert dpo_loss(same, same, same, same, 0.1)[0].item() == pytest.approx(math.log(2))
    assert dpo_loss(same, same, same, same, 0.1, "ipo")[0].item() == pytest.approx(25.0)
    assert dpo_loss(same, same, same, same, 0.1, "hinge")[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(same, same, same, same, 0.1, "nope")


def test_answer_logps_sums_only_labelled_tokens():
    # Vocabulary of 2; logits make token 1 have probability 0.75 everywhere.
    logits = torch.log(torch.tensor([0.25, 0.75])).expand(1, 4, 2).clone()
    labels = torch.tensor([[-100, -100, 1, 0]])  # positions 2 and 3 are the answer
    expected = math.log(0.75) + math.log(0.25)
    assert answer_logps(logits, labels).item() == pytest.approx(expected)
