"""SophiaG: momentum preconditioned by a diagonal Gauss-Newton-Bartlett Hessian, clipped per coordinate.

Follows Liu et al. (2023), "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", Algorithm 3 with the Gauss-Newton-Bartlett (GNB) estimator of Algorithm 2:

    m_t = b1 m_{t-1} + (1 - b1) g_t
    every k steps:  h = b2 h + (1 - b2) h_hat,   h_hat = B * g_hat (.) g_hat
    theta = theta (1 - lr wd)                                     (decoupled weight decay)
    theta = theta - lr clip(m_t / max(rho h, eps), -1, 1)

where g_hat is the gradient of the mean cross-entropy of the model's logits against labels *sampled*
from those logits, over B label positions. `estimate_hessian` computes g_hat and B; the trainer calls
it when `hessian_due(step)`.

We wrote it because no maintained package implements SophiaG with the GNB estimator; the
authors' reference code (github.com/Liuhong99/Sophia) is a script to copy, not a package.

Departures from the paper: B is the number of label tokens the sampled loss was averaged over (the
reference code likewise uses batch size x block length). We fold B into the EMA's new term; the
reference code keeps the EMA of g (.) g and multiplies rho * B * h in the denominator instead,
which is the same update while B is constant. The reference code also adds 1e-15 to the
denominator where the paper (and this code) takes max(rho h, eps). Until the first estimate h is
0, so the update is lr * sign(m).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


class SophiaG(torch.optim.Optimizer):
    """SophiaG (Liu et al., 2023, Algorithm 3). Call `update_hessian` (via `estimate_hessian`)
    every `hessian_every` steps; `step` uses the latest estimate."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.0,
        eps: float = 1e-15,
        hessian_every: int = 10,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas {list(betas)} must each be in [0, 1)")
        if rho <= 0 or eps <= 0:
            raise ValueError(f"rho ({rho}) and eps ({eps}) must be > 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if hessian_every < 1:
            raise ValueError(f"hessian_every must be >= 1, got {hessian_every}")
        # hessian_every lives in defaults so it survives deepcopy/pickle (Optimizer.__getstate__
        # keeps only defaults, state and param_groups).
        defaults = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "weight_decay": weight_decay,
            "eps": eps,
            "hessian_every": hessian_every,
        }
        super().__init__(params, defaults)

    @property
    def hessian_every(self) -> int:
        """Re-estimate the Hessian every this many optimizer steps."""
        return int(self.defaults["hessian_every"])

    def hessian_due(self, step: int) -> bool:
        """Whether the Hessian should be re-estimated at optimizer step `step` (0 counts: the first
        step then already has an estimate)."""
        return step % self.hessian_every == 0

    def _state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, tokens: int) -> None:
        """h = b2 h + (1 - b2) tokens g (.) g for every parameter with a gradient, where g is the
        gradient of the sampled-label loss averaged over `tokens` label tokens (GNB estimator)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for param in group["params"]:
                if param.grad is None:
                    continue
                hessian = self._state(param)["hessian"]
                hessian.mul_(beta2).addcmul_(param.grad, param.grad, value=(1 - beta2) * tokens)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One SophiaG update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, eps, weight_decay = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            beta1 = group["betas"][0]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._state(param)
                state["step"] += 1
                exp_avg, hessian = state["exp_avg"], state["hessian"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                param.mul_(1 - lr * weight_decay)
                # |m| / max(rho h, eps) clipped at 1, times sign(m) == clip(m / max(rho h, eps), -1, 1):
                # no coordinate moves by more than lr, however flat the curvature estimate.
                ratio = (exp_avg.abs() / (rho * hessian).clamp(min=eps)).clamp(max=1.0)
                param.addcmul_(exp_avg.sign(), ratio, value=-lr)
        return loss


def estimate_hessian(model: nn.Module, inputs: Mapping[str, Any], optimizer: SophiaG) -> None:
    """Refresh `optimizer`'s Hessian with one GNB estimate on the batch `inputs`.

    Runs `model` on `inputs` without "labels", samples y ~ Categorical(logits) at the positions
    whose (shifted) label is not -100, backpropagates the mean cross-entropy against y and calls
    `optimizer.update_hessian` with the number of those positions. Gradients are cleared before and
    after, so call it outside gradient accumulation (e.g. right after `optimizer.step()`).
    """
    labels = inputs["labels"]
    model.zero_grad(set_to_none=True)
    logits = model(**{key: value for key, value in inputs.items() if key != "labels"}).logits
    # Causal LM shift as in transformers' loss: logits at t predict the label at t + 1.
    mask = labels[:, 1:] != IGNORE_INDEX
    tokens = int(mask.sum())
    if tokens == 0:
        # Nothing to estimate from; an update with 0 tokens would only decay h.
        return
    picked = logits[:, :-1][mask].float()
    with torch.no_grad():
        sampled = torch.distributions.Categorical(logits=picked).sample()
    F.cross_entropy(picked, sampled).backward()
    optimizer.update_hessian(tokens=tokens)
    model.zero_grad(set_to_none=True)
