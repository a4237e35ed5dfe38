"""DPO-family losses against their formulas on hand-computed log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.dpo import answer_logps, answer_tokens, dpo_loss

# Two pairs. Pair 0: the policy moved +1 on chosen and -1 on rejected (margin 2); pair 1: margin -0.5.
CHOSEN = torch.tensor([-3.0, -5.0])
REJECTED = torch.tensor([-6.0, -4.0])
REF_CHOSEN = torch.tensor([-4.0, -5.0])
REF_REJECTED = torch.tensor([-5.0, -4.5])
CHOSEN_TOKENS = torch.tensor([1, 1])  # one-token answers: IPO's per-token average is the sum
REJECTED_TOKENS = torch.tensor([1, 1])


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
        CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta, loss_type, smoothing, CHOSEN_TOKENS, REJECTED_TOKENS
    )
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.25])


def test_zero_margin_gives_the_known_starting_values():
    same = torch.tensor([-2.0])
    assert dpo_loss(same, same, same, same, 0.1)[0].item() == pytest.approx(math.log(2))
    one = torch.tensor([3])
    assert dpo_loss(same, same, same, same, 0.1, "ipo", 0.0, one, one)[0].item() == pytest.approx(25.0)
    assert dpo_loss(same, same, same, same, 0.1, "hinge")[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(same, same, same, same, 0.1, "nope")


def test_answer_logps_sums_only_labelled_tokens():
    # Vocabulary of 2; logits make token 1 have probability 0.75 everywhere.
    logits = torch.log(torch.tensor([0.25, 0.75])).expand(1, 4, 2).clone()
    labels = torch.tensor([[-100, -100, 1, 0]])  # positions 2 and 3 are the answer
    expected = math.log(0.75) + math.log(0.25)
    assert answer_logps(logits, labels).item() == pytest.approx(expected)


# --- IPO: one definition for text (trl) and image-text (lmforge) DPO ------------------------------
# A pair batch as trl lays it out: row 0 the chosen answer, row 1 the rejected one; per-token
# log-probs of the answer tokens (0 where the mask is 0) and the completion mask.
POLICY = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
REFERENCE = torch.tensor([[-2.0, -2.0, -2.0], [-1.0, -1.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def trl_ipo_loss(
    policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """trl 1.16.0's IPO, reproduced from `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py, the
    `loss_type == "ipo"` branch; defaults: no `ld_alpha`, `f_divergence_type` reverse_kl). trl has
    no public function of log-probs for it: the loss is computed inside the model forward's step.
    The batch is [chosen; rejected]; log-probs are summed over the completion, then each answer's
    log-ratio is divided by its completion token count."""
    chosen_logps, rejected_logps = (policy * mask).sum(dim=1).chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = (reference * mask).sum(dim=1).chunk(2, dim=0)
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    ipo_delta = chosen_avg_score - rejected_avg_score
    return ((ipo_delta - 1 / (2 * beta)) ** 2).mean()


def as_logits_and_labels(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels (one prompt token first) whose labelled tokens have exactly these log-probs:
    a vocabulary of 2, the label always token 1, p(1) = exp(log-prob)."""
    rows, width = per_token.shape
    p = per_token.exp().clamp(max=1 - 1e-6)
    logits = torch.zeros(rows, width + 1, 2)
    logits[:, :width] = torch.stack([torch.log1p(-p), per_token], dim=-1)
    labels = torch.full((rows, width + 1), -100)
    labels[:, 1:][mask.bool()] = 1
    return logits, labels


def test_ipo_averages_each_answers_log_ratio_over_its_tokens():
    # chosen: log-ratio (-3) - (-6) = 3 over 3 tokens = 1; rejected: (-4) - (-2) = -2 over 2 tokens = -1.
    # beta 0.5: (1 - (-1) - 1 / (2 * 0.5))^2 = 1. Summed instead, it would be (3 + 2 - 1)^2 = 16.
    logps, ref_logps = (POLICY * MASK).sum(1), (REFERENCE * MASK).sum(1)
    tokens = MASK.sum(1)
    losses, _, _ = dpo_loss(
        logps[:1], logps[1:], ref_logps[:1], ref_logps[1:], 0.5, "ipo", 0.0, tokens[:1], tokens[1:]
    )
    assert losses.tolist() == pytest.approx([1.0])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_image_text_ipo_equals_trls_on_the_same_batch(beta):
    # The image-text path as `VisionDPOTrainer.compute_loss` runs it: answer log-probs and token counts
    # from logits and labels, then dpo_loss; here policy and reference give the per-token log-probs above.
    policy_logits, labels = as_logits_and_labels(POLICY, MASK)
    reference_logits, _ = as_logits_and_labels(REFERENCE, MASK)
    logps, ref_logps = answer_logps(policy_logits, labels), answer_logps(reference_logits, labels)
    tokens = answer_tokens(labels)
    assert tokens.tolist() == [3, 2] and logps.tolist() == pytest.approx([-3.0, -4.0], abs=1e-5)
    losses, _, _ = dpo_loss(
        logps[:1], logps[1:], ref_logps[:1], ref_logps[1:], beta, "ipo", 0.0, tokens[:1], tokens[1:]
    )
    assert losses.mean().item() == pytest.approx(trl_ipo_loss(POLICY, REFERENCE, MASK, beta).item(), abs=1e-5)
    assert trl_ipo_loss(POLICY, REFERENCE, MASK, 0.5).item() == pytest.approx(1.0)


def test_ipo_needs_the_answer_lengths():
    same = torch.tensor([-2.0])
    with pytest.raises(ValueError, match="ipo averages .* over its tokens"):
        dpo_loss(same, same, same, same, 0.1, "ipo")
