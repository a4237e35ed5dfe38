"""PPO math against values worked out by hand from the formulas, on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

NAN = float("nan")
# Row 0 has two response tokens, row 1 one; the rest is padding.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-9, atol=1e-9)


# --- masked statistics ------------------------------------------------------------------------


def test_masked_mean_over_all_and_along_a_dim():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(masked_mean(x, MASK), (1 + 2 + 4) / 3)
    close(masked_mean(x, MASK, dim=1), [(1 + 2) / 2, 4.0])
    close(masked_mean(x, MASK.bool()), (1 + 2 + 4) / 3)


def test_masked_statistics_ignore_padding_even_nan():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    garbage = t([[1.0, 2.0, NAN], [4.0, 1e30, -math.inf]])
    close(masked_mean(garbage, MASK), masked_mean(x, MASK))
    close(masked_var(garbage, MASK), masked_var(x, MASK))
    close(masked_whiten(garbage, MASK), masked_whiten(x, MASK))


def test_masked_var_unbiased_and_biased():
    # elements 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 14/3
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    close(masked_var(x, MASK), (14 / 3) / 2)
    close(masked_var(x, MASK, unbiased=False), (14 / 3) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_masked_whiten_with_and_without_shifting_the_mean():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean, std = 7 / 3, math.sqrt(7 / 3)
    close(
        masked_whiten(x, MASK, eps=0.0),
        [[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]],
    )
    close(
        masked_whiten(x, MASK, shift_mean=False, eps=0.0),
        [[(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0], [(4 - mean) / std + mean, 0.0, 0.0]],
    )
    whitened = masked_whiten(x, MASK)
    close(masked_mean(whitened, MASK), 0.0)
    torch.testing.assert_close(masked_var(whitened, MASK), torch.tensor(1.0, dtype=torch.float64))


# --- per-token rewards -------------------------------------------------------------------------

LOGPROBS = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.9]])
REF_LOGPROBS = t([[-1.5, -1.0, -0.5], [-0.1, -1.0, 7.7]])
FULL_AND_TWO = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # rows of length 3 and 2
SCORE = t([[2.0, -1.0]])[0]


def test_per_token_rewards_k1_puts_the_score_on_each_rows_last_token():
    rewards, kl = per_token_rewards(SCORE, LOGPROBS, REF_LOGPROBS, FULL_AND_TWO, kl_coef=0.1)
    # k1 = logp - ref: row 0: 0.5, -1.0, 0.0; row 1: -0.2, -0.2, (padding)
    close(kl, [[0.5, -1.0, 0.0], [-0.3 + 0.1, -1.2 + 1.0, 0.0]])
    close(
        rewards,
        [[-0.1 * 0.5, -0.1 * -1.0, 0.0 + 2.0], [-0.1 * (-0.3 + 0.1), -0.1 * (-1.2 + 1.0) - 1.0, 0.0]],
    )


def test_per_token_rewards_k3_matches_the_formula_and_is_non_negative():
    rewards, kl = per_token_rewards(
        SCORE, LOGPROBS, REF_LOGPROBS, FULL_AND_TWO, kl_coef=0.1, kl_estimator="k3"
    )

    def k3(logp: float, ref: float) -> float:
        return (math.exp(ref - logp) - 1) - (ref - logp)

    expected_kl = [[k3(-1.0, -1.5), k3(-2.0, -1.0), 0.0], [k3(-0.3, -0.1), k3(-1.2, -1.0), 0.0]]
    close(kl, expected_kl)
    close(rewards[0, 2], 2.0)  # k3 of equal log-probs is 0: only the score
    close(rewards[1, 1], -0.1 * k3(-1.2, -1.0) - 1.0)

    generator = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 16, generator=generator) * 3, torch.randn(4, 16, generator=generator) * 3
    _, kl = per_token_rewards(torch.zeros(4), logp, ref, torch.ones(4, 16), 0.1, kl_estimator="k3")
    assert bool((kl >= 0).all())


def test_per_token_rewards_ignore_padding():
    garbage_logp, garbage_ref = LOGPROBS.clone(), REF_LOGPROBS.clone()
    garbage_logp[1, 2], garbage_ref[1, 2] = NAN, 1e4
    for estimator in ("k1", "k3"):
        expected = per_token_rewards(SCORE, LOGPROBS, REF_LOGPROBS, FULL_AND_TWO, 0.1, estimator)
        actual = per_token_rewards(SCORE, garbage_logp, garbage_ref, FULL_AND_TWO, 0.1, estimator)
        close(actual[0], expected[0])
        close(actual[1], expected[1])


def test_per_token_rewards_reject_bad_input():
    with pytest.raises(ValueError, match="kl_estimator"):
        per_token_rewards(SCORE, LOGPROBS, REF_LOGPROBS, FULL_AND_TWO, 0.1, "k2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(SCORE, LOGPROBS, REF_LOGPROBS, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 0.1)


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_by_hand():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 0.4, 0.3]])
    gamma, lam = 0.9, 0.8
    delta2 = 2.0 + gamma * 0.0 - 0.3  # no value after the last token
    delta1 = 0.0 + gamma * 0.3 - 0.4
    delta0 = 1.0 + gamma * 0.4 - 0.5
    a2 = delta2
    a1 = delta1 + gamma * lam * a2
    a0 = delta0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma, lam)
    close(advantages, [[a0, a1, a2]])
    close(returns, [[a0 + 0.5, a1 + 0.4, a2 + 0.3]])
    close(advantages, [[1.64768, 1.094, 1.7]])


def test_gae_padding_does_not_leak():
    gamma, lam = 0.9, 0.8
    rewards = t([[1.0, 0.0, 2.0], [1.0, 2.0, 100.0]])
    values = t([[0.5, 0.4, 0.3], [0.5, 0.4, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    a1 = 2.0 - 0.4
    a0 = (1.0 + gamma * 0.4 - 0.5) + gamma * lam * a1
    close(advantages[1], [a0, a1, 0.0])
    close(returns[1], [a0 + 0.5, a1 + 0.4, 0.0])
    alone, alone_returns = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma, lam)
    close(advantages[1, :2], alone[0])
    close(returns[1, :2], alone_returns[0])
    rewards[1, 2], values[1, 2] = NAN, -math.inf
    again, again_returns = gae(rewards, values, mask, gamma, lam)
    close(again, advantages)
    close(again_returns, returns)


def test_gae_without_discount_is_reward_to_go_minus_values():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 0.4, 0.3]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[3.0 - 0.5, 2.0 - 0.4, 2.0 - 0.3]])
    close(returns, [[3.0, 2.0, 2.0]])


# --- policy loss -------------------------------------------------------------------------------

POLICY_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADVANTAGES = t([[2.0, 1.0, -1.0], [-3.0, 0.5, 0.0]])


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    loss, stats = policy_loss(logprobs, logprobs.clone(), ADVANTAGES, POLICY_MASK, clip_range=0.2)
    close(loss, -(2.0 + 1.0 - 1.0 - 3.0 + 0.5) / 5)
    close(stats["clipfrac"], 0.0)
    close(stats["approx_kl"], 0.0)
    close(stats["ratio"], 1.0)


def test_policy_loss_clips_by_hand_and_the_clipped_tokens_get_no_gradient():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logprobs = t([[math.log(1.5), math.log(1.1), 0.0], [math.log(0.5), 0.0, 0.0]]).requires_grad_()
    loss, stats = policy_loss(logprobs, old, ADVANTAGES, POLICY_MASK, clip_range=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=2:  max(-3.0, -2.4) = -2.4  (clipped)
    #   r=1.1, A=1:  max(-1.1, -1.1) = -1.1
    #   r=1.0, A=-1: 1.0
    #   r=0.5, A=-3: max(1.5, 2.4) = 2.4     (clipped: no push below 1 - eps on a bad token)
    #   r=1.0, A=0.5: -0.5
    close(loss, (-2.4 - 1.1 + 1.0 + 2.4 - 0.5) / 5)
    close(stats["clipfrac"], 2 / 5)
    close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + math.log(1.1) ** 2 + math.log(0.5) ** 2) / 5)
    close(stats["ratio"], (1.5 + 1.1 + 1.0 + 0.5 + 1.0) / 5)
    assert not stats["clipfrac"].requires_grad
    loss.backward()
    # d(-A r)/dlogp = -A r / 5 where unclipped; 0 where clipped or masked
    close(logprobs.grad, [[0.0, -1.0 * 1.1 / 5, 1.0 / 5], [0.0, -0.5 / 5, 0.0]])


def test_policy_loss_ignores_padding():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logprobs = t([[math.log(1.5), math.log(1.1), 0.0], [math.log(0.5), 0.0, 0.0]])
    expected_loss, expected_stats = policy_loss(logprobs, old, ADVANTAGES, POLICY_MASK, 0.2)
    garbage_logprobs, garbage_advantages = logprobs.clone(), ADVANTAGES.clone()
    garbage_logprobs[1, 2], garbage_advantages[1, 2] = 1000.0, NAN
    garbage_logprobs.requires_grad_()
    loss, stats = policy_loss(garbage_logprobs, old, garbage_advantages, POLICY_MASK, 0.2)
    close(loss, expected_loss)
    for key, value in expected_stats.items():
        close(stats[key], value)
    loss.backward()
    assert bool(torch.isfinite(garbage_logprobs.grad).all())
    close(garbage_logprobs.grad[1, 2], 0.0)


# --- value loss --------------------------------------------------------------------------------


def test_value_loss_clips_by_hand():
    # numbers exact in binary, so "clipped term larger" is decided without rounding
    values = t([[1.0, 2.0, 0.0], [0.5, 3.0, 0.0]]).requires_grad_()
    old = t([[0.75, 1.0, 0.0], [0.5, 2.0, 0.0]])
    returns = t([[1.5, 1.0, 1.0], [0.0, 4.0, 0.0]])
    loss, stats = value_loss(values, old, returns, POLICY_MASK, clip_range_value=0.5)
    # per token max((V - R)^2, (V_clipped - R)^2):
    #   V=1, old=.75 (inside), R=1.5: .25
    #   V=2, old=1 -> Vc=1.5, R=1:    max(1, .25) = 1
    #   V=0, old=0, R=1:              1
    #   V=.5, old=.5, R=0:            .25
    #   V=3, old=2 -> Vc=2.5, R=4:    max(1, 2.25) = 2.25  (clipped)
    close(loss, 0.5 * (0.25 + 1.0 + 1.0 + 0.25 + 2.25) / 5)
    close(stats["vf_clipfrac"], 1 / 5)
    loss.backward()
    # d 0.5 (V - R)^2 / 5 = (V - R) / 5 where unclipped; 0 where clipped or masked
    close(values.grad, [[(1.0 - 1.5) / 5, (2.0 - 1.0) / 5, (0.0 - 1.0) / 5], [(0.5 - 0.0) / 5, 0.0, 0.0]])

    garbage_values, garbage_old, garbage_returns = values.detach().clone(), old.clone(), returns.clone()
    garbage_values[1, 2], garbage_old[1, 2], garbage_returns[1, 2] = NAN, 1e30, -math.inf
    again, again_stats = value_loss(garbage_values, garbage_old, garbage_returns, POLICY_MASK, 0.5)
    close(again, loss.detach())
    close(again_stats["vf_clipfrac"], 1 / 5)


# --- entropy, explained variance ---------------------------------------------------------------


def test_entropy_from_logits():
    close(
        entropy_from_logits(torch.zeros(2, 3, 7, dtype=torch.float64)),
        torch.full((2, 3), math.log(7), dtype=torch.float64),
    )
    # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(t([[0.0, math.log(3)]])), [expected])
    close(entropy_from_logits(t([[1000.0, 1000.0 + math.log(3)]])), [expected])  # no overflow


def test_explained_variance():
    returns = t([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    close(explained_variance(returns.clone(), returns, MASK), 1.0)
    # returns 1, 2, 4 (Var 14/9); residuals 0, 0, 1 (Var 2/9)
    values = t([[1.0, 2.0, NAN], [3.0, -5.0, 1e30]])
    close(explained_variance(values, returns, MASK), 1 - (2 / 9) / (14 / 9))
    close(explained_variance(values, torch.ones(2, 3, dtype=torch.float64), MASK), 0.0)  # constant returns


# --- KL controllers ----------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_towards_the_target_by_at_most_the_clip():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert controller.value == 0.1
    controller.update(current_kl=6.6, n_steps=256)  # error 0.1
    assert controller.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))
    controller.value = 0.1
    controller.update(current_kl=60.0, n_steps=256)  # error 9 -> clipped to 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    controller.value = 0.1
    controller.update(current_kl=3.0, n_steps=256)  # error -0.5 -> clipped to -0.2
    assert controller.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    controller.value = 0.1
    controller.update(current_kl=6.0, n_steps=256)  # on target
    assert controller.value == pytest.approx(0.1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(init_kl_coef=0.1, target=0.0, horizon=10000)


def test_fixed_kl_controller_never_changes():
    controller = FixedKLController(kl_coef=0.05)
    controller.update(current_kl=100.0, n_steps=256)
    controller.update(current_kl=0.0, n_steps=256)
    assert controller.value == 0.05
