"""The pure math of RLHF with PPO: per-token rewards, GAE, the clipped losses, KL control.

Follows InstructGPT (Ouyang et al., 2022, "Training language models to follow instructions with
human feedback", eq. 2) as implemented in Ziegler et al. (2019, "Fine-Tuning Language Models from
Human Preferences") and spelled out in Huang et al. (2024, "The N Implementation Details of RLHF
with PPO: A Case Study on TL;DR Summarization"). Where each formula comes from:

- Reward (InstructGPT eq. 2, Ziegler sec. 2.2): a KL penalty on every response token,
  r_t = -beta * kl_t, plus the reward model's sequence score on the last response token.
  kl_t is k1 = log pi(y_t) - log pi_ref(y_t) (Ziegler, InstructGPT) or k3 =
  (ratio - 1) - log ratio with ratio = pi_ref / pi (Schulman, 2020, "Approximating KL
  divergence"; unbiased and never negative).
- Advantages: generalized advantage estimation (Schulman et al., 2016, "High-Dimensional
  Continuous Control Using Generalized Advantage Estimation", eq. 16), the episode ending after
  the last response token (value 0 beyond it).
- Policy loss: PPO's clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization
  Algorithms", eq. 7), as a loss to minimise, averaged over the batch's response tokens.
- Value loss: the clipped value loss of OpenAI baselines' ppo2 (Huang et al. 2024, detail
  "value function clipping"), with its factor 0.5.
- Whitening: masked over the whole batch; rewards are whitened without shifting the mean and
  advantages with it (Huang et al. 2024, "reward whitening" and "advantage whitening").
- KL coefficient: the adaptive controller of Ziegler et al. (2019, sec. 2.2), or a fixed one.

Masks are B x T (bool or 0/1 float), 1 for response tokens and 0 for the padding after the end;
each row's response tokens form a prefix. Masked positions are ignored exactly: they are
replaced with 0 before any arithmetic, so any padding value (including inf and nan) changes
neither results nor gradients. Outputs are 0 at masked positions. Nothing here detaches: rewards,
values for GAE and old log-probs are expected to come in detached (computed under no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


def _keep(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask, 0 elsewhere (a select, not a product: nan/inf padding does not leak)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the positions where mask is set (all of them, or along `dim`).

    An empty mask (or an empty row along `dim`) gives nan.
    """
    mask = mask.bool()
    if dim is None:
        return _keep(x, mask).sum() / mask.sum()
    return _keep(x, mask).sum(dim) / mask.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the positions where mask is set; `unbiased` uses n - 1 (Bessel)."""
    mask = mask.bool()
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked elements, got {n}")
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the unmasked elements of the whole batch; 0 at masked positions.

    `shift_mean=False` adds the mean back (only the scale changes), as for rewards. The variance is
    the unbiased one, as in trl and Huang et al. (2024).
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _keep(whitened, mask)


def per_token_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """InstructGPT's reward: -kl_coef * kl_t on every token, plus `score` (B,) on each row's last token.

    Returns (rewards, kl), both B x T and 0 at masked positions. Raises ValueError for an unknown
    estimator or a row with no response token (its score would have nowhere to go).
    """
    mask = mask.bool()
    log_ratio = _keep(logprobs - ref_logprobs, mask)
    if kl_estimator == "k1":
        kl = log_ratio
    elif kl_estimator == "k3":
        ref_over_policy = -log_ratio
        kl = torch.expm1(ref_over_policy) - ref_over_policy
    else:
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")
    kl = _keep(kl, mask)

    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1)
    if bool((last < 0).any()):
        empty = (last < 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no response token (mask all 0): nowhere to put their score")
    is_last = positions[None, :] == last[:, None]
    rewards = -kl_coef * kl + _keep(score[:, None].to(kl.dtype).expand_as(kl), is_last)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation backwards over T; returns (advantages, returns = A + V).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A taken
    as 0 beyond each row's last response token (the episode ends there). Both outputs are B x T and 0
    at masked positions.
    """
    mask = mask.bool()
    rewards = _keep(rewards, mask)
    values = _keep(values, mask)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = _keep(delta + gamma * lam * next_advantage, mask[:, t])
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), token-averaged.

    Stats (detached): `clipfrac`, the share of tokens where the clipped term was the larger one;
    `approx_kl`, the mean of 0.5 * (logp - old)^2; `ratio`, the mean ratio.
    """
    mask = mask.bool()
    log_ratio = _keep(logprobs - old_logprobs, mask)
    advantages = _keep(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clipped - R)^2)), V_clipped = old +- clip.

    Stats (detached): `vf_clipfrac`, the share of tokens where the clipped term was the larger one.
    """
    mask = mask.bool()
    values, old_values, returns = _keep(values, mask), _keep(old_values, mask), _keep(returns, mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim (B x T x V -> B x T), in the logits' dtype.

    Uses H = logsumexp(z) - sum(softmax(z) * z), stable for large finite logits.
    """
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over the unmasked elements (1: perfect values, 0: no better than a mean).

    When the returns are constant (Var(R) = 0) the ratio is undefined; this returns 0 rather than nan
    or -inf, so the logged metric stays finite and reads as "explains nothing".
    """
    mask = mask.bool()
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    is_constant = var_returns == 0
    ratio = var_residual / torch.where(is_constant, torch.ones_like(var_returns), var_returns)
    return torch.where(is_constant, torch.zeros_like(ratio), 1.0 - ratio)


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019) sec. 2.2: move the KL coefficient towards a target KL, at most 20% per horizon.

    update: e = clip(kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    """

    init_kl_coef: float
    target: float
    horizon: int
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(
                f"target and horizon must be > 0, got target={self.target}, horizon={self.horizon}"
            )
        self.value = self.init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


@dataclass
class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface."""

    kl_coef: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""
