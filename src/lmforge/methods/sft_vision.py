"""Image-text SFT for vision-language models (Qwen2-VL, Qwen2.5-VL): records with images -> an adapter.

`lmforge train` runs this instead of `methods/sft.py` when the model has a vision tower. The seed
strategy for Qwen2-VL is `adapter.method: vision_lora`: LoRA on the vision tower only, the language
model frozen; `adapter.vision_parts` adds the projector (merger) and/or the language model. Any
other adapter method trains the language model's layers. Frozen parts stay bit-identical (tested).

Records: `messages` (or any layout in docs/data.md) with one `<image>` per image in the text and an
`images` list of paths relative to the dataset's folder; see `data/multimodal.py` for how images
become tokens and what is refused.

Top to bottom: config -> tokenizer, template and image processor -> examples encoded with their
images -> model + adapter -> trainer -> train (resuming when asked) -> save (with the processor).
"""

from __future__ import annotations

from datasets import Dataset
from rich.console import Console

from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.multimodal import VisionCollator, VisionProcessor, encode_multimodal
from lmforge.data.tokenize import TokenizeStats
from lmforge.methods import sft
from lmforge.models.loading import load_tokenizer
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    resolve_template,
    train_and_save,
)
from lmforge.training.trainer import ForgeTrainer, stage_trainer, training_arguments

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """Image-text SFT's own combinations (on top of sft.check), before anything is loaded."""
    sft.check(config)
    if config.data.packing or config.data.streaming:
        raise ValueError(
            "image-text SFT reads whole examples with their images: turn off data.packing and data.streaming"
        )
    if config.adapter.method == "none":
        raise ValueError("image-text SFT trains an adapter: set adapter.method: vision_lora (or lora)")


def encode_all(examples, template, tokenizer, vision: VisionProcessor, config: RunConfig):
    rows, stats = [], TokenizeStats()
    for example in examples:
        row = encode_multimodal(
            example, template, tokenizer, vision, config.data.max_length, config.data.train_on
        )
        if row is None:
            stats.dropped += 1
            stats.note("dropped", example.where)
            continue
        rows.append(row)
        stats.examples += 1
        stats.tokens += len(row["input_ids"])
        stats.label_tokens += sum(label != -100 for label in row["labels"])
    return Dataset.from_list(rows), stats


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    data_config = config.data
    vision = VisionProcessor.load(
        config.model.name_or_path, tokenizer, data_config.min_pixels, data_config.max_pixels
    )
    data = load_examples(data_config, "sft")
    train_rows, stats = encode_all(data.train, template, tokenizer, vision, config)
    eval_rows = encode_all(data.eval, template, tokenizer, vision, config)[0] if data.eval else None
    if len(train_rows) == 0:
        raise ValueError("no training example has a response token within data.max_length")
    if not quiet:
        images = sum(len(paths) for paths in train_rows["image_paths"])
        console.print(
            f"[bold]image-text data[/]: {stats.examples} examples, {images} images, {stats.tokens:,} tokens"
        )

    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, len(train_rows)))
    model.config.use_cache = False
    args = training_arguments(
        config.train, hardware, data_config.max_length, eval_rows is not None, padding_free=False
    )
    trainer = stage_trainer(
        ForgeTrainer,
        config,
        model,
        "sft",
        quiet,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        data_collator=VisionCollator(tokenizer.pad_token_id, vision),
    )
    # adapter.method is never none here (checked): the artifact is the adapter, with the images' processor
    return train_and_save(
        trainer, config, tokenizer, template, stats, eval_rows is not None, quiet,
        image_processor=vision.image_processor,
    )  # fmt: skip
