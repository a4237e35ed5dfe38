"""Image-text examples for vision-language models (Qwen2-VL, Qwen2.5-VL).

A record's `<image>` placeholders become the template's image string (for Qwen2-VL
`<|vision_start|><|image_pad|><|vision_end|>`); each image is opened, resized by the model's image
processor within `data.min_pixels`/`data.max_pixels`, and cut into patches; then that image's one
`<|image_pad|>` token is repeated once per merged patch, which is how the model finds where each
image's features go. Image tokens are never learned (label -100).

Errors name the record: a missing or unreadable image, a format other than jpg/png/webp, a
placeholder count that differs from the image count, and a `data.max_length` that would cut an
image's tokens (the fix: raise max_length or lower max_pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from lmforge.data.files import DataError
from lmforge.data.formats import Example
from lmforge.data.templates import AnyTemplate, Conversation
from lmforge.data.tokenize import IGNORE, encode_conversation

FORMATS = {".jpg", ".jpeg", ".png", ".webp"}
IMAGE_TOKEN = "<|image_pad|>"


def open_image(path: Path, where: str) -> Image.Image:
    """An RGB image, or a DataError naming the record and the file."""
    if path.suffix.lower() not in FORMATS:
        raise DataError(
            f"{where}: image {path.name} is {path.suffix or 'without extension'}; use jpg, png or webp"
        )
    if not path.is_file():
        raise DataError(f"{where}: image {path} does not exist (paths are relative to the dataset's folder)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{where}: image {path} cannot be read ({error})") from None


@dataclass
class VisionProcessor:
    """The image side of a vision-language model: its image processor and image token."""

    image_processor: object
    image_token_id: int
    merge_size: int

    @classmethod
    def load(
        cls,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        min_pixels: int | None,
        max_pixels: int | None,
    ) -> VisionProcessor:
        from transformers import AutoImageProcessor

        from lmforge.models.location import model_location

        limits = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        processor = AutoImageProcessor.from_pretrained(model_location(model_path), **limits)
        if limits:  # Qwen2-VL reads its limits from `size` too
            size = dict(getattr(processor, "size", {}) or {})
            size.update({"shortest_edge": min_pixels or size.get("shortest_edge")})
            size.update({"longest_edge": max_pixels or size.get("longest_edge")})
            processor.size = size
            for key, value in limits.items():
                setattr(processor, key, value)
        token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token is None or token == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer of {model_path} has no {IMAGE_TOKEN} token: is it a Qwen2-VL model?"
            )
        return cls(processor, token, int(getattr(processor, "merge_size", 2)))

    def pixels(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values: patches x features, image_grid_thw: images x 3)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens_per_image(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw.prod(-1) // self.merge_size**2).tolist()


def expand_image_tokens(
    input_ids: list[int], labels: list[int], image_token: int, counts: list[int]
) -> tuple[list[int], list[int]]:
    """Repeat the i-th image token counts[i] times (labels -100 on all of them)."""
    ids_out: list[int] = []
    labels_out: list[int] = []
    image = 0
    for token, label in zip(input_ids, labels, strict=True):
        if token == image_token:
            ids_out += [token] * counts[image]
            labels_out += [IGNORE] * counts[image]
            image += 1
        else:
            ids_out.append(token)
            labels_out.append(label)
    return ids_out, labels_out


def encode_multimodal(
    example: Example,
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    vision: VisionProcessor,
    max_length: int,
    train_on: str = "all_turns",
    conversation: Conversation | None = None,
) -> dict | None:
    """input_ids, labels, pixel_values, image_grid_thw for one example (None: no answer token fits)."""
    encoded, _ = encode_conversation(
        conversation or example.conversation(), template, tokenizer, 10**9, train_on
    )
    if encoded is None:
        return None
    placeholders = encoded["input_ids"].count(vision.image_token_id)
    if placeholders != len(example.images):
        raise DataError(
            f"{example.where}: {placeholders} image placeholders in the text but {len(example.images)} "
            "images; put one <image> in the text per image"
        )
    ids, labels = encoded["input_ids"], encoded["labels"]
    if example.images:
        # The image processor's grid fixes how many tokens each image takes; the pixels themselves
        # are made again in the collator, so a data set never holds them all in memory.
        _, grid = vision.pixels([open_image(p, example.where) for p in example.images])
        counts = vision.tokens_per_image(grid)
        ids, labels = expand_image_tokens(ids, labels, vision.image_token_id, counts)
        last_image = max(i for i, t in enumerate(ids) if t == vision.image_token_id)
        if last_image >= max_length:
            raise DataError(
                f"{example.where}: its images take {sum(counts)} tokens and the last "
                f"one ends at token {last_image + 1}, past data.max_length={max_length}; raise "
                "data.max_length or lower data.max_pixels"
            )
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels, "image_paths": [str(p) for p in example.images]}


class VisionCollator:
    """Pads a batch of multimodal rows (right padding) and makes their images' pixels."""

    def __init__(self, pad_token_id: int, vision: VisionProcessor) -> None:
        self.pad, self.vision = pad_token_id, vision

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad)
        labels = torch.full((len(rows), width), IGNORE)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        batch["mm_token_type_ids"] = (
            ids == self.vision.image_token_id
        ).long() * mask  # image tokens (M-RoPE)
        paths = [path for row in rows for path in row.get("image_paths") or []]
        if paths:
            images = [open_image(Path(path), path) for path in paths]
            batch["pixel_values"], batch["image_grid_thw"] = self.vision.pixels(images)
        return batch
