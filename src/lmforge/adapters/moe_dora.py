"""MoE-DoRA: a mixture of DoRA experts on each adapted linear layer, chosen per token by a router.

Formulation. For a frozen linear layer y = W0 x + b, each of E experts is a DoRA update
(Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):

    W_e = m_e * (W0 + s B_e A_e) / ||W0 + s B_e A_e||_row,   s = alpha / r  (rsLoRA: alpha / sqrt(r))

with a learned magnitude m_e (one value per output row), A_e (r x in) and B_e (out x r). A router
(a bias-free linear layer, in -> E) scores the experts from the layer's input token; the top-k are
kept and their softmax probabilities renormalised into gates g_e(x) that sum to 1 (the routing of
MoLoRA, Zadouri et al., 2023, and MixLoRA, Li et al., 2024; top-k as in Mixtral):

    y = sum_e g_e(x) W_e x + b

At initialisation B_e = 0 and m_e = ||W0||_row, so every expert equals W0 and the adapted model
computes exactly the base model.

Load balancing: the Switch Transformer auxiliary loss (Fedus et al., 2022) for top-k routing,
L_aux = E * sum_i f_i P_i, with f_i the share of the batch's (token, slot) assignments that went
to expert i and P_i the router's mean probability for expert i, over non-padding tokens. It is 1
for uniform routing and grows as routing collapses. The mean over adapted layers, times
`aux_loss_weight`, is added to the training loss (as Mixtral's `router_aux_loss_coef`); with
gradient accumulation each micro-batch's term is weighted by its share of the label tokens, so the
sum over micro-batches is the token-weighted mean.

Where this departs from the papers, and why:
- As DoRA section 4.3 recommends, the row norm is a constant in back-propagation (detached):
  about the same accuracy for much less memory. It is computed without forming W0 + s B A:
  ||W0 + s B A||^2 = ||W0||^2 + 2 s rowsum(B * W0 A^T) + s^2 rowsum((B A A^T) * B), per row.
- Experts are evaluated densely, unselected ones with gate 0: each is only rank r, and at these
  sizes a gather/scatter dispatch costs more than the E * r extra rank.
- One router per adapted linear layer (MoLoRA); MixLoRA shares one router per FFN block.
- Per-token routing makes the weight update depend on the input, so it cannot be merged into W0:
  the adapter stays an adapter, served as is (`lmforge merge` refuses it and says so).

Saved as `moe_dora_config.json` + `moe_dora_model.safetensors` (adapter tensors only). This is
lmforge's own format: peft cannot load it (peft has no public way to register a new method).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.utils.integrations import dequantize_module_weight
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

CONFIG_FILE = "moe_dora_config.json"
WEIGHTS_FILE = "moe_dora_model.safetensors"


@dataclass
class MoeDoraSettings:
    """What a MoE-DoRA adapter is: where it sits and its shape (saved as moe_dora_config.json)."""

    targets: list[str]
    experts: int = 4
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    aux_loss_weight: float = 0.01
    base_model: str = ""
    format: str = field(default="lmforge-moe-dora-v1")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def load_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss for top-k routing: E * sum_i f_i * P_i.

    `probs` (..., E) are the router's softmax probabilities, `chosen` (..., k) the selected
    experts, `mask` (...) 1 for tokens that count (padding excluded).
    """
    experts = probs.shape[-1]
    probs = probs.reshape(-1, experts)
    chosen = chosen.reshape(probs.shape[0], -1)
    weight = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    if mask is not None:
        weight = mask.reshape(-1).to(probs.dtype)
    tokens = weight.sum().clamp_min(1.0)
    assigned = F.one_hot(chosen, experts).to(probs.dtype).sum(1)  # (tokens, E): 1 where routed
    share = (assigned * weight[:, None]).sum(0) / (tokens * chosen.shape[-1])
    mean_prob = (probs * weight[:, None]).sum(0) / tokens
    return experts * (share * mean_prob).sum()


class _Batch:
    """The current batch's token mask, shared by the wrapper with its layers."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class MoeDoraLinear(nn.Module):
    """A frozen linear layer (plain or bitsandbytes 4/8-bit) plus E routed DoRA experts."""

    def __init__(self, base_layer: nn.Module, settings: MoeDoraSettings, batch: _Batch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.top_k = settings.top_k
        self.scaling = settings.scaling
        self.enabled = True
        self.aux_loss: torch.Tensor | None = None
        self._batch = batch
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        weight = dequantize_module_weight(base_layer).detach()
        out_features, in_features = weight.shape
        experts, r = settings.experts, settings.r
        kwargs = {"device": weight.device, "dtype": torch.float32}
        self.experts_A = nn.Parameter(torch.empty(experts, r, in_features, **kwargs))
        self.experts_B = nn.Parameter(torch.zeros(experts, out_features, r, **kwargs))
        self.router = nn.Parameter(torch.empty(experts, in_features, **kwargs))
        for expert in range(experts):  # LoRA's initialisation of A, one expert at a time
            nn.init.kaiming_uniform_(self.experts_A.data[expert], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.router.data, a=math.sqrt(5))
        self.register_buffer("w0_sq", weight.float().pow(2).sum(1), persistent=False)
        # m_e = ||W0||_row, computed by the same function as the forward's norm: ratio exactly 1.
        self.magnitude = nn.Parameter(self.expert_norms().clone())

    @torch.no_grad()
    def expert_norms(self) -> torch.Tensor:
        """||W0 + s B_e A_e|| per expert and output row, (E, out); detached (DoRA section 4.3)."""
        a, b = self.experts_A, self.experts_B
        w0 = dequantize_module_weight(self.base_layer).to(a.dtype)
        cross = (b * torch.einsum("oi,eri->eor", w0, a)).sum(-1)
        quad = ((b @ (a @ a.transpose(1, 2))) * b).sum(-1)
        s = self.scaling
        return (self.w0_sq + 2 * s * cross + s * s * quad).clamp_min(1e-12).sqrt()

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (..., E), chosen experts (..., k) and renormalised gates (..., E)."""
        probs = F.linear(h, self.router).float().softmax(-1)
        top_p, chosen = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, chosen, top_p / top_p.sum(-1, keepdim=True))
        return probs, chosen, gates

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return result
        bias = self.base_layer.bias
        base_out = result - bias if bias is not None else result
        h = x.to(self.experts_A.dtype)
        probs, chosen, gates = self.route(h)
        if self.training and torch.is_grad_enabled():
            mask = self._batch.mask
            usable = mask is not None and mask.shape == h.shape[:-1]
            self.aux_loss = load_balancing_loss(probs, chosen, mask if usable else None)
        scale = self.magnitude / self.expert_norms()  # (E, out): m_e / ||W0 + s B_e A_e||
        # The low-rank products run in autocast's dtype when it is on (einsum is not on its list).
        device = h.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        ax = torch.einsum("...i,eri->...er", self.dropout(h).to(low), self.experts_A.to(low))
        weighted_b = (scale.unsqueeze(-1) * self.experts_B).to(low)
        delta = torch.einsum("...er,eor->...o", ax * gates.unsqueeze(-1).to(low), weighted_b)
        with torch.autocast(device, enabled=False):  # sum_e g_e m_e / ||.||: ~1, keep it in float32
            mix = gates @ scale
        out = base_out.to(h.dtype) * mix + self.scaling * delta.to(h.dtype)
        if bias is not None:
            out = out + bias
        return out.to(result.dtype)


class MoeDoraModel(nn.Module):
    """A causal LM with MoE-DoRA layers; its state (save, load, checkpoints) is the adapter alone."""

    # transformers refuses to train a quantized model unless it has trainable adapters attached;
    # this attribute is how it recognises that (peft sets it too).
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, settings: MoeDoraSettings) -> None:
        super().__init__()
        if not 1 <= settings.top_k <= settings.experts:
            raise ValueError(
                f"adapter.moe_dora.top_k ({settings.top_k}) must be between 1 and "
                f"moe_dora.experts ({settings.experts})"
            )
        self.causal_lm = model
        self.settings = settings
        self._batch = _Batch()
        model.requires_grad_(False)
        for name in settings.targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MoeDoraLinear(getattr(parent, child), settings, self._batch))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.causal_lm, name)

    def moe_layers(self) -> Iterator[tuple[str, MoeDoraLinear]]:
        for name, module in self.causal_lm.named_modules():
            if isinstance(module, MoeDoraLinear):
                yield name, module

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        layers = [module for _, module in self.moe_layers()]
        for module in layers:
            module.aux_loss = None
        self._batch.mask = attention_mask
        outputs = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        losses = [module.aux_loss for module in layers if module.aux_loss is not None]
        if not losses:
            return outputs
        aux = torch.stack(losses).mean()
        outputs["aux_loss"] = aux.detach()
        if labels is not None and outputs.loss is not None and self.settings.aux_loss_weight > 0:
            share = 1.0
            total = kwargs.get("num_items_in_batch")
            if total is not None:  # gradient accumulation: this micro-batch's share of label tokens
                share = (labels[..., 1:] != -100).sum() / total
            outputs["loss"] = outputs.loss + self.settings.aux_loss_weight * share * aux
        return outputs

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The mean load-balancing loss of the last training forward (then cleared)."""
        losses = []
        for _, module in self.moe_layers():
            if module.aux_loss is not None:
                losses.append(module.aux_loss)
                module.aux_loss = None
        return torch.stack(losses).mean() if losses else None

    def generate(self, *args, **kwargs):
        return self.causal_lm.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.causal_lm

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside this block (e.g. as a reference model)."""
        layers = [module for _, module in self.moe_layers()]
        for module in layers:
            module.enabled = False
        try:
            yield
        finally:
            for module in layers:
                module.enabled = True

    def merge_and_unload(self):
        raise ValueError(
            "a MoE-DoRA adapter cannot be merged: each token is routed to its own experts, so the weight "
            "update depends on the input and no single merged weight reproduces it. Keep it as an adapter "
            "(lmforge chat/serve load it over the base model)."
        )

    # The module's state is the adapter alone: the frozen base is loaded from its own checkpoint.
    # Trainer checkpoints (which save and resume `state_dict()`) therefore hold only the adapter.
    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{param}": tensor.detach()
            for name, module in self.moe_layers()
            for param, tensor in module.named_parameters(recurse=False)
        }

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {
            f"{name}.{param}": tensor
            for name, module in self.moe_layers()
            for param, tensor in module.named_parameters(recurse=False)
        }
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"MoE-DoRA weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key, tensor in state_dict.items():
                if key in own:
                    own[key].copy_(tensor)
        return _IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, save_directory: str | Path, **_: object) -> None:
        """moe_dora_config.json + moe_dora_model.safetensors (adapter tensors only)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.contiguous() for key, value in self.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        (out / CONFIG_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, is_trainable: bool = False) -> MoeDoraModel:
        """Attach a saved MoE-DoRA adapter to `model` (its base, plain or quantized)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a MoE-DoRA adapter folder (no {CONFIG_FILE})")
        settings = MoeDoraSettings(**json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
        missing = [name for name in settings.targets if not _has_module(model, name)]
        if missing:
            raise ValueError(
                f"{path}: the adapter wraps layers this model does not have ({', '.join(missing[:3])}); "
                f"load it over the base it was trained on ({settings.base_model or 'see its config'})"
            )
        wrapped = cls(model, settings)
        wrapped.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        for _, module in wrapped.moe_layers():
            for tensor in module.parameters(recurse=False):
                tensor.requires_grad_(is_trainable)
        return wrapped


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_moe_dora_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()
