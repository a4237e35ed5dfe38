"""Muon for the hidden weight matrices, AdamW for everything else, as one torch Optimizer.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al.,
2025, "Muon is Scalable for LLM Training") orthogonalises each matrix's momentum with Newton-Schulz
iterations. It is meant for hidden 2-D weights only: embeddings and the output head are lookups and
classifiers rather than linear maps between hidden states, and norms and biases are not matrices,
so those train with AdamW. torch.optim.Muon takes 2-D parameters only, so the rare ndim > 2 weight
(a convolution) goes to AdamW too.

The trainer, LR schedulers and accelerate see one optimizer: `param_groups` is the list of both
inner optimizers' group dicts (the same objects, so a scheduler setting group["lr"] drives the inner
optimizers), `state` is one dict both inner optimizers write to (their parameters are disjoint), and
`state_dict`/`load_state_dict` are torch's, over those groups, so a checkpoint is a plain optimizer
state dict that `torch.load(weights_only=True)` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmforge.optim.groups import decay_groups, trainable

# Parameter names of the input embeddings and the output head, for models without
# get_input_embeddings / get_output_embeddings.
EMBEDDING_NAME_PARTS = ("embed", "lm_head")


def _embedding_param_ids(model: nn.Module) -> set[int] | None:
    """ids of the parameters of `model`'s input and output embeddings; None if it cannot say."""
    ids: set[int] = set()
    answered = False
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        method = getattr(model, getter, None)
        if not callable(method):
            continue
        try:
            module = method()
        except (NotImplementedError, AttributeError):
            # Some backbones (speech, vision) raise instead of returning None.
            continue
        answered = True
        if isinstance(module, nn.Module):
            ids.update(id(param) for param in module.parameters())
    return ids if answered else None


def split_muon_params(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) trainable parameters of `model`, each in `named_parameters` order.

    Muon gets the 2-D weights that are not part of the input embeddings or the output head, found
    by tensor identity (so tied heads and peft-wrapped models work), or by name ("embed",
    "lm_head") when the model has no embedding accessors. AdamW gets the rest.
    """
    embedding_ids = _embedding_param_ids(model)
    muon, adamw = [], []
    for name, param in trainable(model):
        if embedding_ids is None:
            is_embedding = any(part in name for part in EMBEDDING_NAME_PARTS)
        else:
            is_embedding = id(param) in embedding_ids
        (muon if param.ndim == 2 and not is_embedding else adamw).append((name, param))
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `model`'s hidden matrices and torch.optim.AdamW over the rest.

    `lr` and `weight_decay` apply to both parts (the AdamW part's lr is `adamw_lr` when given);
    weight decay is decoupled and skips AdamW's 1-D parameters (norms, biases).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        muon_named, adamw_named = split_muon_params(model)
        # Either part may be empty (e.g. LoRA trains only matrices): torch optimizers refuse
        # an empty parameter list, so such a part has no inner optimizer.
        self.muon: torch.optim.Muon | None = None
        self.adamw: torch.optim.AdamW | None = None
        if muon_named:
            self.muon = torch.optim.Muon(
                [{"params": [p for _, p in muon_named], "lr": lr, "weight_decay": weight_decay}],
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            )
        if adamw_named:
            part_lr = lr if adamw_lr is None else adamw_lr
            self.adamw = torch.optim.AdamW(
                decay_groups(adamw_named, part_lr, weight_decay),
                lr=part_lr,
                betas=adamw_betas,
                eps=adamw_eps,
                weight_decay=weight_decay,
            )
        # The inner optimizers' own group dicts become ours (add_param_group appends the dict it
        # is given); it also checks that no parameter is in both parts.
        groups = [group for inner in self._inner() for group in inner.param_groups]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._link()
        self._built = True

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [inner for inner in (self.muon, self.adamw) if inner is not None]

    def _link(self) -> None:
        """Make the inner optimizers use our group dicts and our state dict."""
        start = 0
        for inner in self._inner():
            count = len(inner.param_groups)
            inner.param_groups = self.param_groups[start : start + count]
            inner.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Muon step of the hidden matrices and one AdamW step of the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load (new group dicts and state), then re-point the inner optimizers at them."""
        super().load_state_dict(state_dict)
        self._link()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while building: a later group would belong to neither inner optimizer."""
        if getattr(self, "_built", False):
            raise NotImplementedError("MuonWithAdamW cannot take parameter groups after it is built")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults, state and param_groups; a copy also needs
        # the inner optimizers (pickle keeps the dicts they share with us shared).
        return {**super().__getstate__(), "muon": self.muon, "adamw": self.adamw, "_built": True}
