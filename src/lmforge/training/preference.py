"""What the preference stages (DPO, ORPO, SimPO, KTO, reward) share, and image-text DPO's trainer.

trl's preference trainers tokenize their own data. lmforge hands them conversational records
(prompt messages, then the answer messages) and sets the tokenizer's `chat_template` to the
stage's template rendered as Jinja. trl then renders exactly what SFT trained on, with the
template's stop token ending every answer.

The reference model: with a peft adapter, trl keeps a frozen copy of the adapter as it was when
the stage started (adapter name "ref"). For a fresh adapter that is the base. For an adapter
continued from SFT (`adapter.path`), it is base + that SFT adapter, never the bare base, which is
the pitfall that makes the KL blow up. MoE-DoRA is not a peft adapter, so trl cannot switch it:
its reference log-probs are always precomputed from the starting model (`method.precompute_ref`
is forced on).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer

from lmforge.adapters.build import peft_config, prepare_base
from lmforge.adapters.moe_dora import MoeDoraModel
from lmforge.config import RunConfig
from lmforge.data.formats import Example
from lmforge.data.templates import AnyTemplate
from lmforge.data.tokenize import IGNORE, encode_conversation
from lmforge.losses.dpo import answer_logps, answer_tokens, dpo_loss
from lmforge.training.compat import log_metric
from lmforge.training.stage import load_model_for_training


def policy_model(config: RunConfig, quiet: bool, total_steps: int):
    """(model, hardware, peft config for trl or None) for DPO and KTO.

    trl keeps the reference as a frozen copy ("ref") of a peft model's adapter. AdaLoRA allows
    only one trainable adapter per model, so for AdaLoRA trl wraps the base itself from the peft
    config and takes the reference with the adapter disabled (the base: right for a fresh one).
    """
    if config.adapter.method != "adalora":
        model, hardware = load_model_for_training(config, quiet, total_steps)
        return model, hardware, None
    # Not when continuing an AdaLoRA adapter (adapter.path): RunConfig refuses that for preference stages.
    bare = config.model_copy(update={"adapter": config.adapter.model_copy(update={"method": "none"})})
    model, hardware = load_model_for_training(bare, quiet=True)
    model = prepare_base(model, config.adapter, config.train.gradient_checkpointing)
    return model, hardware, peft_config(config.adapter, model, total_steps)


@contextmanager
def reference(model) -> Iterator[None]:
    """The starting model: the frozen "ref" copy of a continued adapter, else the adapter disabled."""
    if "ref" in model.peft_config:
        model.set_adapter("ref", inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter("default")
    else:
        with model.disable_adapter():
            yield


def keep_reference_copy(model) -> None:
    """Continuing an adapter: keep a frozen copy of it as the reference (peft adapter "ref")."""
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.set_adapter("default")


def use_template(tokenizer: PreTrainedTokenizerBase, template: AnyTemplate) -> None:
    """Make trl's chat-template rendering lmforge's template."""
    tokenizer.chat_template = template.jinja(tokenizer)


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """System, earlier turns and the last user message, as chat messages."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    for user, assistant in example.turns[:-1]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": example.prompt})
    return messages


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _no_images(examples: list[Example], stage: str) -> None:
    with_images = [e.where for e in examples if e.images]
    if with_images:
        raise ValueError(
            f"{with_images[0]}: has images; image-text preference pairs need a vision-language model "
            f"(e.g. Qwen2-VL) with method.name: dpo ({stage} on this model reads text only)"
        )


def pair_dataset(examples: list[Example], stage: str, with_margin: bool = False) -> Dataset:
    """prompt / chosen / rejected (conversational) for DPO, ORPO, SimPO and reward models."""
    _no_images(examples, stage)
    rows = []
    for example in examples:
        row = {
            "prompt": prompt_messages(example),
            "chosen": _answer(example.response),
            "rejected": _answer(example.rejected or ""),
        }
        if with_margin:
            margin = example.reference.get("margin")
            if not isinstance(margin, int | float):
                raise ValueError(
                    f"{example.where}: method.margin is on but this record has no numeric `margin` field"
                )
            row["margin"] = float(margin)
        rows.append(row)
    return Dataset.from_list(rows)


def kto_dataset(examples: list[Example]) -> Dataset:
    """prompt / completion / label (conversational) for KTO."""
    _no_images(examples, "kto")
    return Dataset.from_list(
        [
            {"prompt": prompt_messages(e), "completion": _answer(e.response), "label": bool(e.label)}
            for e in examples
        ]
    )


def kto_from_pairs(examples: list[Example]) -> list[Example]:
    """Preference pairs as unpaired KTO examples: the chosen answer desirable, the rejected not."""
    out = []
    for e in examples:
        out.append(Example(turns=e.turns, system=e.system, label=True, where=e.where))
        rejected = (*e.turns[:-1], (e.prompt, e.rejected or ""))
        out.append(Example(turns=rejected, system=e.system, label=False, where=e.where))
    return out


class MoeAuxLoss:
    """Adds MoE-DoRA's load-balancing loss to a trl trainer's loss (a mixin before the trainer).

    The layers store it during the policy's forward (in training, with gradients on); trl's
    reference forwards run without gradients and leave it alone.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        if not isinstance(unwrapped, MoeDoraModel) or not model.training:
            return result
        aux = unwrapped.pop_aux_loss()
        if aux is None or unwrapped.settings.aux_loss_weight == 0:
            return result
        log_metric(self, "train", "moe_aux_loss", aux.item())
        extra = unwrapped.settings.aux_loss_weight * aux
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra


@dataclass
class PairScores:
    """Summed log-probs and answer lengths (tokens) of each pair's chosen and rejected answers."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor

    def implicit_accuracy(self, start: PairScores) -> float:
        """DPO's implicit-reward accuracy: log pi/pi_start of chosen > that of rejected."""
        margin = (self.chosen - start.chosen) - (self.rejected - start.rejected)
        return (margin > 0).float().mean().item()

    def normalized_accuracy(self) -> float:
        """Reference-free (SimPO's reward): mean per-token log-prob of chosen > of rejected."""
        return (self.chosen / self.chosen_len > self.rejected / self.rejected_len).float().mean().item()


@torch.no_grad()
def score_pairs(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    examples: list[Example],
    max_length: int,
    batch_size: int = 16,
) -> PairScores:
    """Log-probs of each pair's chosen and rejected answer (the template's stop token included)."""
    rows = []
    for example in examples:
        for answer in (example.response, example.rejected or ""):
            encoded, _ = encode_conversation(example.conversation(answer), template, tokenizer, max_length)
            if encoded is None:
                raise ValueError(f"{example.where}: no answer token fits in {max_length} tokens")
            rows.append(encoded)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, lengths = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor(
            [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch], device=device
        )
        labels = torch.tensor(
            [r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in batch], device=device
        )
        mask = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch], device=device
        )
        logps.append(answer_logps(model(input_ids=ids, attention_mask=mask).logits, labels).cpu())
        lengths.append((labels[:, 1:] != IGNORE).sum(-1).cpu())
    model.train(was_training)
    flat, counts = torch.cat(logps), torch.cat(lengths).float()
    return PairScores(flat[0::2], flat[1::2], counts[0::2], counts[1::2])


class VisionDPOTrainer(Trainer):
    """transformers' Trainer with DPO's loss on image-text pairs."""

    def __init__(
        self, *args, beta: float, loss_type: str, label_smoothing: float, sft_weight: float, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.beta, self.loss_type = beta, loss_type
        self.label_smoothing, self.sft_weight = label_smoothing, sft_weight
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = answer_logps(model(**inputs).logits, inputs["labels"])
        with torch.no_grad(), reference(self.accelerator.unwrap_model(model)):
            ref_logps = answer_logps(model(**inputs).logits, inputs["labels"])
        n = len(logps) // 2
        tokens = answer_tokens(inputs["labels"])
        losses, chosen, rejected = dpo_loss(
            logps[:n],
            logps[n:],
            ref_logps[:n],
            ref_logps[n:],
            self.beta,
            self.loss_type,
            self.label_smoothing,
            tokens[:n],
            tokens[n:],
        )
        loss = losses.mean()
        if self.sft_weight > 0:
            loss = loss + self.sft_weight * -(logps[:n].sum() / tokens[:n].sum().clamp(min=1))
        metrics = self._metrics["train" if model.training else "eval"]
        for key, value in {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": logps[:n].mean(),
            "logps/rejected": logps[n:].mean(),
            "logratio/chosen": chosen.mean() / self.beta,
            "logratio/rejected": rejected.mean() / self.beta,
        }.items():
            metrics[key].append(float(value.detach()))
        return (loss, {"logits": None}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items()})
        self._metrics[mode].clear()
        super().log(logs, start_time)
