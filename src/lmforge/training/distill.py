"""Logit distillation's machinery: the shared-vocabulary check, the frozen teacher and the
trainer whose loss is `losses/kd.distillation_loss` (see `methods/distill.py`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import RunConfig
from lmforge.config.method import DistillOptions
from lmforge.config.model import ModelConfig
from lmforge.losses.kd import distillation_loss
from lmforge.models.loading import load_causal_lm
from lmforge.training.compat import log_metric
from lmforge.training.trainer import ForgeTrainer


def shared_vocabulary(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, options) -> int:
    """The vocabulary size both use (logits beyond it, embedding padding, are ignored); a clear error
    when the tokenizers differ."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        differing = next(
            (tok for tok, i in student_vocab.items() if teacher_vocab.get(tok) != i), "(sizes differ)"
        )
        raise ValueError(
            f"the student ({len(student_vocab)} tokens) and the teacher {options.teacher} "
            f"({len(teacher_vocab)} tokens) use different tokenizers (e.g. {differing!r} maps to "
            f"{student_vocab.get(differing)} vs {teacher_vocab.get(differing)}): logit distillation needs "
            "one vocabulary. Use a student of the teacher's family, or set "
            "method.distill.sequence_level: true to train on the teacher's answers instead"
        )
    return len(student_vocab)


def load_teacher(config: RunConfig, hardware) -> PreTrainedModel:
    """The frozen teacher (optionally quantized, optionally with an adapter), in eval mode."""
    options = config.method.distill
    teacher_config = ModelConfig(
        name_or_path=options.teacher,
        quantization=options.teacher_quantization,
        trust_remote_code=config.model.trust_remote_code,
        device=config.model.device,
        dtype=config.model.dtype,
    )
    teacher, _ = load_causal_lm(teacher_config, for_training=False, hardware=hardware, quiet=True)
    if options.teacher_adapter:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, options.teacher_adapter, is_trainable=False)
    teacher.config.use_cache = False
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


class DistillTrainer(ForgeTrainer):
    """ForgeTrainer whose loss is distillation's: the teacher scores the same rows, no grad."""

    def __init__(self, *args, teacher: PreTrainedModel, options: DistillOptions, vocab: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.options, self.vocab = teacher, options, vocab

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        features = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**features, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(**features, use_cache=False).logits
        options = self.options
        # num_items_in_batch counts the label tokens of the whole accumulated batch; the Trainer
        # divides by the accumulation steps itself only when the model takes no loss kwargs.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, parts = distillation_loss(
            outputs.logits[:, :-1, : self.vocab],
            teacher_logits[:, :-1, : self.vocab].to(outputs.logits.device),
            inputs["labels"][:, 1:],
            options.loss,
            options.temperature,
            options.jsd_beta,
            options.alpha,
            items,
        )
        if items is not None and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss: items counts every process's tokens and DDP averages the
            # processes' gradients, so each process's share is scaled back up (x1 in one process).
            loss = loss * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        for name, value in parts.items():
            log_metric(self, mode, name, value)
        return (loss, outputs) if return_outputs else loss
