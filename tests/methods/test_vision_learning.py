"""Learning test for image-text SFT: Vision-LoRA teaches a tiny Qwen2-VL to see colours.

The task (`data/shapes.py`): one coloured shape per 56x56 image, "What colour is the shape?", four
colours. A random tiny VLM cannot even say a colour word, so its language model first learns to
answer (a short LoRA on the language model, merged): it then names a colour but guesses from the
untrained vision tower's features. The seed strategy follows: LoRA on the vision tower only, the
language model frozen. Held-out accuracy (greedy, exact word, 60 unseen images) must rise clearly.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import corpus
from lmforge.config import validate_config
from lmforge.data.shapes import COLOURS, SHAPES, write_shapes_task
from lmforge.data.templates import Conversation
from lmforge.export.merge import merge_adapter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.methods import sft
from lmforge.models.tiny import build_tiny_qwen2_vl, build_tiny_tokenizer, save_tiny_vlm


def accuracy(model, adapter, held) -> float:
    engine = Engine.load(str(model), adapter=str(adapter) if adapter else None, template="qwen2-vl")
    records = json.loads(held.read_text())
    questions = [Conversation(turns=[(r["messages"][0]["content"], "")]) for r in records]
    images = [[held.parent / r["images"][0]] for r in records]
    answers = engine.generate(questions, SamplingParams(max_new_tokens=4), batch_size=30, images=images)
    return sum(a.strip() == r["messages"][1]["content"] for a, r in zip(answers, records, strict=True)) / len(
        records
    )


def stage(base, data, out, parts, steps) -> dict:
    return {
        "model": {"name_or_path": str(base)},
        "adapter": {"method": "vision_lora", "vision_parts": parts, "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "template": "qwen2-vl", "max_length": 128},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 16,
            "lr": 1e-2,
            "warmup_ratio": 0.05,
            "logging_steps": 20,
            "progress": False,
            "tensorboard": False,
            "save_steps": 0,
        },
    }


def test_vision_lora_raises_held_out_image_accuracy(tmp_path):
    torch.set_num_threads(2)
    tokenizer = build_tiny_tokenizer(
        [*corpus(), *COLOURS, *SHAPES, "What colour is the shape?"], vocab_size=360
    )
    vlm = save_tiny_vlm(build_tiny_qwen2_vl(tokenizer), tokenizer, tmp_path / "vlm")
    train = write_shapes_task(tmp_path / "train", 240, seed=0)
    held = write_shapes_task(tmp_path / "held", 60, seed=1)
    speaker = sft.run(validate_config(stage(vlm, train, tmp_path / "a", ["language"], 60)), quiet=True)
    base = merge_adapter(str(vlm), speaker.artifact, tmp_path / "speaks")
    before = accuracy(base, None, held)
    seeing = sft.run(validate_config(stage(base, train, tmp_path / "b", ["vision"], 200)), quiet=True)
    assert all(".visual.blocks." in k for k in load_file(seeing.artifact / "adapter_model.safetensors"))
    after = accuracy(base, seeing.artifact, held)
    print(f"held-out colour accuracy: {before:.2f} -> {after:.2f} after Vision-LoRA (language model frozen)")
    assert after >= before + 0.15
