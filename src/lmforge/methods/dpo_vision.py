"""Image-text DPO for vision-language models (Qwen2-VL): preference pairs that share images.

`lmforge train` runs this instead of trl's DPOTrainer when `method.name: dpo` meets a model with a
vision tower. trl's own vision path needs the model's full processor, whose video half requires
torchvision; lmforge encodes images itself (`data/multimodal.py`, as for image-text SFT), so here the
trainer is transformers' Trainer with DPO's loss (`losses/dpo.py`: sigmoid, ipo, hinge, robust, the
same definitions as trl's, tested by hand and against trl's on one batch) on the summed log-probs
of each answer (ipo, as trl's, divides each answer's log-ratio by its token count).

Each pair is one prompt with its images and two answers; a batch runs the chosen and the rejected
rows in one forward pass (the images go in twice). The reference is the starting model, as in text
DPO: the adapter disabled for a new adapter, a frozen copy ("ref") of the adapter continued with
`adapter.path`. `precompute_ref` is refused (the reference runs every step); `sft_weight` adds NLL on
the chosen answer. Logged per step: loss, rewards/chosen|rejected|margins|accuracies, logps/*,
logratio/*.

Top to bottom: config -> tokenizer, template, image processor -> pairs encoded with their images ->
model + adapter -> trainer -> train -> save the adapter (with the image processor).
"""

from __future__ import annotations

import torch
from datasets import Dataset
from rich.console import Console
from transformers import TrainingArguments

from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.multimodal import VisionCollator, VisionProcessor, encode_multimodal
from lmforge.data.tokenize import TokenizeStats
from lmforge.methods import dpo
from lmforge.models.loading import load_tokenizer
from lmforge.training.preference import VisionDPOTrainer, keep_reference_copy
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    resolve_template,
    train_and_save,
)
from lmforge.training.trainer import common_arguments, stage_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """Image-text DPO's own combinations (on top of dpo.check), before anything is loaded."""
    dpo.check(config)
    method = config.method
    if method.name != "dpo":
        raise ValueError(
            f"{method.name} on a vision-language model is not available; image-text preference training "
            "runs with method.name: dpo"
        )
    if method.precompute_ref:
        raise ValueError("method.precompute_ref is not available for image-text DPO; turn it off")
    if config.adapter.method in ("none", "moe_dora"):
        raise ValueError("image-text DPO trains a peft adapter: set adapter.method: vision_lora (or lora)")
    if config.data.packing or config.data.streaming:
        raise ValueError("image-text DPO reads whole pairs: turn off data.packing and data.streaming")


def encode_pairs(examples, template, tokenizer, vision: VisionProcessor, max_length: int) -> Dataset:
    rows = []
    for example in examples:
        sides = {}
        for side, answer in (("chosen", example.response), ("rejected", example.rejected or "")):
            conversation = example.conversation(answer)
            sides[side] = encode_multimodal(
                example, template, tokenizer, vision, max_length, conversation=conversation
            )
        if sides["chosen"] is None or sides["rejected"] is None:
            raise ValueError(f"{example.where}: no answer token fits in data.max_length={max_length}")
        rows.append(
            {
                "chosen_input_ids": sides["chosen"]["input_ids"],
                "chosen_labels": sides["chosen"]["labels"],
                "rejected_input_ids": sides["rejected"]["input_ids"],
                "rejected_labels": sides["rejected"]["labels"],
                "image_paths": sides["chosen"]["image_paths"],
            }
        )
    return Dataset.from_list(rows)


class PairCollator:
    """A batch of pairs as 2N rows: the chosen answers, then the rejected ones (images in both)."""

    def __init__(self, rows: VisionCollator) -> None:
        self.rows = rows

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [
            {
                "input_ids": p[f"{side}_input_ids"],
                "labels": p[f"{side}_labels"],
                "image_paths": p["image_paths"],
            }
            for side in ("chosen", "rejected")
            for p in pairs
        ]
        return self.rows(rows)


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    vision = VisionProcessor.load(
        config.model.name_or_path, tokenizer, config.data.min_pixels, config.data.max_pixels
    )
    data = load_examples(config.data, "preference")
    length = config.data.max_length
    train_ds = encode_pairs(data.train, template, tokenizer, vision, length)
    eval_ds = encode_pairs(data.eval, template, tokenizer, vision, length) if data.eval else None
    if not quiet:
        console.print(f"[bold]image-text pairs[/]: {len(train_ds)} train")

    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, len(train_ds)))
    if config.adapter.path:
        keep_reference_copy(model)
    model.config.use_cache = False
    args = TrainingArguments(
        **common_arguments(config.train, hardware, eval_ds is not None), prediction_loss_only=True
    )
    method = config.method
    trainer = stage_trainer(
        VisionDPOTrainer,
        config,
        model,
        "dpo",
        quiet,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PairCollator(VisionCollator(tokenizer.pad_token_id, vision)),
        processing_class=tokenizer,
        beta=method.preference_beta,
        loss_type=method.loss_type,
        label_smoothing=method.label_smoothing,
        sft_weight=method.sft_weight,
    )
    stats = TokenizeStats(examples=len(train_ds))
    return train_and_save(
        trainer,
        config,
        tokenizer,
        template,
        stats,
        eval_ds is not None,
        quiet,
        image_processor=vision.image_processor,
    )
