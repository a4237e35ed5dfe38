"""Cross-entropy summed over the accumulated batch: exact gradient accumulation for models that
ignore `num_items_in_batch` (T5, MarianMT, BERT)."""

from __future__ import annotations

import torch


def summed_cross_entropy(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The Trainer's `compute_loss_func`: cross-entropy summed over the labelled positions (-100 left
    out) and divided by the labelled positions of the whole accumulated batch (`num_items_in_batch`;
    this batch's own count when not given, as in evaluation).

    Why: T5, MarianMT and BERT accept `num_items_in_batch` but ignore it and return a per-batch mean,
    which the Trainer then takes as already normalized: with train.grad_accum = 4 the gradient came
    out 4x too large. Summing here makes batch 8 x accumulation 1 equal batch 2 x accumulation 4.
    Labels line up with the logits (no shift): decoder outputs (seq2seq), tokens (masked-LM) or one
    class per example (classification).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels.to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp(min=1)
    return total / count
