"""Learning test for image-text SFT: Vision-LoRA teaches a tiny Qwen2-VL to see colours.

The task (`data/shapes.py`): one coloured shape per 56x56 image, "What colour is the shape?", four
colours. A random tiny VLM cannot even say a colour word, so its language model first learns to
answer (a short LoRA on the language model, merged): it then names a colour but guesses from the
untrained vision tower's features. The seed strategy follows: LoRA on the vision tower only, the
language model frozen. Held-out accuracy (greedy, exact word, 60 unseen images) must rise clearly.
Image-text DPO from the same start (the right colour chosen, another rejected, same image) must
raise the share of held-out pairs whose chosen answer the model finds likelier.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus
from lmforge import methods
from lmforge.config import validate_config
from lmforge.data.shapes import COLOURS, SHAPES, write_shapes_task
from lmforge.data.templates import Conversation
from lmforge.export.merge import merge_adapter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models.tiny import build_tiny_qwen2_vl, build_tiny_tokenizer, save_tiny_vlm

# Two threads each; in the group of the other 2-thread learning tests so they never run at once
# (two 2-thread jobs on 2 cores slowed this file 20x).
pytestmark = pytest.mark.xdist_group("quickstart")


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


@pytest.fixture(scope="module")
def speaker(tmp_path_factory):
    """(a tiny Qwen2-VL whose language model has learned to answer with a colour, train and held-out
    data folders): a short LoRA on the language model only, merged."""
    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("vision-learning")
    tokenizer = build_tiny_tokenizer(
        [*corpus(), *COLOURS, *SHAPES, "What colour is the shape?"], vocab_size=360
    )
    vlm = save_tiny_vlm(build_tiny_qwen2_vl(tokenizer), tokenizer, work / "vlm")
    train = write_shapes_task(work / "train", 240, seed=0)
    held = write_shapes_task(work / "held", 60, seed=1)
    speaks = methods.run(validate_config(stage(vlm, train, work / "a", ["language"], 60)), quiet=True)
    return merge_adapter(str(vlm), speaks.artifact, work / "speaks"), train, held


def test_vision_lora_raises_held_out_image_accuracy(tmp_path, speaker):
    torch.set_num_threads(2)
    base, train, held = speaker
    before = accuracy(base, None, held)
    seeing = methods.run(validate_config(stage(base, train, tmp_path / "b", ["vision"], 200)), quiet=True)
    assert all(".visual.blocks." in k for k in load_file(seeing.artifact / "adapter_model.safetensors"))
    after = accuracy(base, seeing.artifact, held)
    print(f"held-out colour accuracy: {before:.2f} -> {after:.2f} after Vision-LoRA (language model frozen)")
    assert after >= before + 0.15


def held_out_preference(model_dir, adapter, pairs_path) -> float:
    """Share of held-out pairs whose chosen answer the model finds likelier than the rejected one."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from lmforge.config.data import DatasetSource
    from lmforge.config.model import ModelConfig
    from lmforge.data.loader import read_source
    from lmforge.data.multimodal import VisionCollator, VisionProcessor
    from lmforge.data.registry import resolve
    from lmforge.data.templates import get_template
    from lmforge.losses.dpo import answer_logps
    from lmforge.methods.dpo_vision import PairCollator, encode_pairs
    from lmforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    vision = VisionProcessor.load(str(model_dir), tokenizer, None, None)
    examples = list(read_source(resolve(DatasetSource(path=str(pairs_path)), ".")))
    pairs = encode_pairs(examples, get_template("qwen2-vl"), tokenizer, vision, 128)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    batch = PairCollator(VisionCollator(tokenizer.pad_token_id, vision))(list(pairs))
    with torch.no_grad():
        logps = answer_logps(model.eval()(**batch).logits, batch["labels"])
    n = len(logps) // 2
    return (logps[:n] > logps[n:]).float().mean().item()


def test_image_text_dpo_moves_the_preference_margin(tmp_path, speaker):
    import random

    torch.set_num_threads(2)
    base, train, held = speaker
    rng = random.Random(0)

    def pairs(data):
        out = [
            {
                "messages": r["messages"][:1],
                "chosen": r["messages"][1]["content"],
                "rejected": rng.choice([c for c in COLOURS if c != r["messages"][1]["content"]]),
                "images": r["images"],
            }
            for r in json.loads(data.read_text())
        ]
        path = data.parent / "pairs.json"
        path.write_text(json.dumps(out))
        return path

    train_pairs, held_pairs = pairs(train), pairs(held)
    raw = stage(base, train_pairs, tmp_path / "dpo", ["vision", "projector", "language"], 60)
    raw["method"] = {"name": "dpo", "beta": 0.1}
    raw["train"]["lr"] = 5e-3
    raw["data"]["eval_path"] = str(held_pairs)
    result = methods.run(validate_config(raw), quiet=True)
    before = held_out_preference(base, None, held_pairs)
    after = held_out_preference(base, result.artifact, held_pairs)
    margin, implicit = result.metrics["eval_rewards/margins"], result.metrics["eval_rewards/accuracies"]
    print(
        f"image-text DPO, held-out pairs: implicit reward accuracy {implicit:.2f}, margin 0 -> {margin:.3f}; "
        f"chosen likelier than rejected {before:.2f} -> {after:.2f}"
    )
    assert margin > 0.05 and implicit >= 0.7, "DPO's own margin moved the right way on unseen images"
    assert after > before
