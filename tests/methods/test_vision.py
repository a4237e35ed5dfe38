"""Image-text SFT and DPO on a tiny random Qwen2-VL: trainable parts, frozen parts, images, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus
from lmforge import methods
from lmforge.config import validate_config
from lmforge.data.files import DataError
from lmforge.data.formats import Example
from lmforge.data.multimodal import VisionProcessor, encode_multimodal
from lmforge.data.shapes import COLOURS, write_shapes_task
from lmforge.data.templates import get_template
from lmforge.models.tiny import build_tiny_qwen2_vl, build_tiny_tokenizer, save_tiny_vlm


def vision_config(vlm_dir, data, out, parts=None, method="vision_lora", **train) -> dict:
    adapter = {"method": method, "r": 4, "alpha": 8, "dropout": 0.0}
    if parts:
        adapter["vision_parts"] = parts
    return {
        "model": {"name_or_path": str(vlm_dir)},
        "adapter": adapter,
        "data": {"path": str(data), "template": "qwen2-vl", "max_length": 64},
        "train": {
            "output_dir": str(out),
            "max_steps": 3,
            "batch_size": 4,
            "lr": 5e-3,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


PART_OF = {"vision": ".visual.blocks.", "projector": ".visual.merger.", "language": ".language_model."}


@pytest.mark.parametrize(
    "parts",
    [["vision"], ["projector"], ["language"], ["vision", "projector"], ["vision", "projector", "language"]],
    ids="+".join,
)
def test_each_choice_of_parts_trains_only_those_parts(tmp_path, vlm_dir, shapes_file, parts):
    result = methods.run(validate_config(vision_config(vlm_dir, shapes_file, tmp_path, parts)), quiet=True)
    weights = load_file(result.artifact / "adapter_model.safetensors")
    touched = {part for part, marker in PART_OF.items() if any(marker in k for k in weights)}
    assert touched == set(parts), "LoRA sits on exactly the chosen parts"
    for part in parts:
        b = [v for k, v in weights.items() if PART_OF[part] in k and "lora_B" in k]
        assert b and any(v.abs().sum() > 0 for v in b), f"the {part} adapter trained"
    assert (result.artifact / "preprocessor_config.json").is_file(), "the image processor is saved with it"
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def test_frozen_parts_stay_bit_identical(tmp_path, vlm_dir, shapes_file):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    result = methods.run(
        validate_config(vision_config(vlm_dir, shapes_file, tmp_path, ["vision"])), quiet=True
    )
    base = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, result.artifact).merge_and_unload()
    merged = model.state_dict()
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed and all(".visual.blocks." in f".{k}" for k in changed), sorted(changed)[:5]


def test_image_limits_change_the_number_of_image_tokens(vlm_dir, tmp_path):
    from PIL import Image

    from lmforge.config.model import ModelConfig
    from lmforge.models.loading import load_tokenizer

    Image.new("RGB", (112, 112), (255, 0, 0)).save(tmp_path / "big.png")
    example = Example(
        turns=(("<image>What colour is the shape?", "red"),), images=(tmp_path / "big.png",), where="r#0"
    )
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(vlm_dir)))
    template = get_template("qwen2-vl")

    def image_tokens(max_pixels):
        vision = VisionProcessor.load(str(vlm_dir), tokenizer, None, max_pixels)
        row = encode_multimodal(example, template, tokenizer, vision, 256)
        return row["input_ids"].count(vision.image_token_id)

    assert image_tokens(112 * 112) == 16  # 8x8 patches of 14 px, merged 2x2
    assert image_tokens(56 * 56) == 4  # scaled down to 4x4 patches


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"images": ["images/missing.png"]}, r"record 2 names missing image file\(s\): .*images/missing.png"),
        ({"images": ["images/a.gif"]}, "a.gif is .gif; use jpg, png or webp"),
        (
            {"text": "<image><image>What colour?"},
            r"record 2 has 2 `<image>` placeholder\(s\) but 1 image\(s\)",
        ),
        ({"max_length": 12}, "past data.max_length=12; raise data.max_length or lower data.max_pixels"),
    ],
    ids=["missing", "format", "mismatch", "cut"],
)
def test_bad_images_are_named(tmp_path, vlm_dir, shapes_file, record, message):
    records = json.loads(shapes_file.read_text())[:4]
    bad = records[2]
    bad["images"] = record.get("images", bad["images"])
    if "text" in record:
        bad["messages"][0]["content"] = record["text"]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.gif").write_bytes(b"GIF89a")
    for r in records:
        for name in r["images"]:
            source = shapes_file.parent / name
            if source.is_file():
                (tmp_path / name).write_bytes(source.read_bytes())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    raw = vision_config(vlm_dir, data, tmp_path / "out")
    raw["data"]["max_length"] = record.get("max_length", 64)
    with pytest.raises((DataError, ValueError), match=message):
        methods.run(validate_config(raw), quiet=True)


def test_engine_and_chat_answer_about_an_image(tmp_path, vlm_dir, shapes_file, base_dir):
    from PIL import Image
    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.data.multimodal import VisionCollator
    from lmforge.data.templates import Conversation
    from lmforge.inference.engine import Engine, SamplingParams

    result = methods.run(validate_config(vision_config(vlm_dir, shapes_file, tmp_path / "sft")), quiet=True)
    engine = Engine.load(str(vlm_dir), adapter=str(result.artifact))
    assert engine.vision is not None and engine.template.name == "qwen2-vl"
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{name}.png")
    question = Conversation(turns=[("<image>What colour is the shape?", "")])
    batch = engine._inputs([question, question], [[tmp_path / "red.png"], [tmp_path / "blue.png"]])
    with torch.no_grad():
        logits = engine.model(**batch).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1]), "the image reaches the model"
    # Inference encodes a prompt exactly as training does (same image tokens, same pixels).
    example = Example(turns=(("<image>What colour is the shape?", "red"),), images=(tmp_path / "red.png",))
    row = encode_multimodal(example, engine.template, engine.tokenizer, engine.vision, 64)
    train_batch = VisionCollator(engine.tokenizer.pad_token_id, engine.vision)([row])
    prompt_len = batch["attention_mask"][0].sum().item()
    assert train_batch["input_ids"][0, :prompt_len].tolist() == batch["input_ids"][0, -prompt_len:].tolist()
    assert torch.equal(train_batch["pixel_values"], batch["pixel_values"][: len(train_batch["pixel_values"])])
    answers = engine.generate([question], SamplingParams(max_new_tokens=3), images=[[tmp_path / "red.png"]])
    assert len(answers) == 1
    image = str(tmp_path / "red.png")
    cli = CliRunner().invoke(
        app,
        ["chat", "--model", str(vlm_dir), "--adapter", str(result.artifact), "--image", image,
         "--temperature", "0", "--max-new-tokens", "3", "What colour is the shape?"],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "assistant" in cli.output
    text_only = CliRunner().invoke(
        app, ["chat", "--model", str(base_dir), "--image", str(tmp_path / "red.png"), "hi"]
    )
    assert text_only.exit_code == 1 and "needs a vision-language model" in text_only.output


def shape_pairs(path, folder, n, seed):
    """Pairs on the shapes task: the right colour chosen, another colour rejected (same image)."""
    import random

    rng = random.Random(seed)
    records = json.loads(write_shapes_task(folder, n, seed=seed).read_text())
    pairs = []
    for r in records:
        answer = r["messages"][1]["content"]
        wrong = rng.choice([c for c in COLOURS if c != answer])
        pairs.append(
            {"messages": r["messages"][:1], "chosen": answer, "rejected": wrong, "images": r["images"]}
        )
    path.write_text(json.dumps(pairs))
    return path


def dpo_config(vlm_dir, data, out, method=None, adapter=None, **train) -> dict:
    raw = vision_config(vlm_dir, data, out, ["vision", "language"], **train)
    raw["method"] = {"name": "dpo", **(method or {})}
    raw["adapter"].update(adapter or {})
    raw["data"]["max_length"] = 128
    return raw


@pytest.mark.parametrize(
    ("method", "start"),
    [({}, math.log(2)), ({"loss_type": "ipo", "beta": 0.1}, (1 / (2 * 0.1)) ** 2)],
    ids=["sigmoid", "ipo"],
)
def test_vision_dpo_starts_at_its_formula_and_trains_the_adapter(tmp_path, vlm_dir, method, start):
    pairs = shape_pairs(tmp_path / "folder" / "pairs.json", tmp_path / "folder", 16, 0)
    frozen = load_file(vlm_dir / "model.safetensors")

    raw = dpo_config(vlm_dir, pairs, tmp_path / "out", method, warmup_ratio=0.0)
    out = methods.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (out.output_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(start, rel=1e-4), "a new adapter is its own reference"
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logratio/chosen",
    ):
        assert key in first
    after = load_file(vlm_dir / "model.safetensors")
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    weights = load_file(out.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert not any(".ref." in k for k in weights)
    assert (out.artifact / "preprocessor_config.json").is_file()


def test_vision_dpo_from_an_sft_adapter_takes_it_as_the_reference(
    tmp_path, vlm_dir, shapes_file, monkeypatch
):
    import math

    from lmforge.methods import dpo_vision

    sft_raw = vision_config(vlm_dir, shapes_file, tmp_path / "sft", ["vision", "language"], max_steps=10)
    sft_raw["data"]["max_length"] = 128
    adapter = methods.run(validate_config(sft_raw), quiet=True).artifact
    pairs = shape_pairs(tmp_path / "folder" / "pairs.json", tmp_path / "folder", 8, 1)
    raw = dpo_config(vlm_dir, pairs, tmp_path / "dpo", adapter={"path": str(adapter)}, max_steps=1)
    out = methods.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (out.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    # The check has teeth: against the bare base (the pitfall) the first loss is not log 2.
    monkeypatch.setattr(dpo_vision, "keep_reference_copy", lambda model: None)
    raw["train"]["output_dir"] = str(tmp_path / "pitfall")
    pitfall = methods.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (pitfall.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["loss"] - math.log(2)) > 1e-3


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "kto"}, "kto on a vision-language model is not available"),
        ({"name": "orpo"}, "orpo on a vision-language model is not available"),
        ({"name": "dpo", "precompute_ref": True}, "precompute_ref is not available for image-text DPO"),
    ],
)
def test_vision_preference_combinations_are_refused(tmp_path, vlm_dir, method, message):
    pairs = shape_pairs(tmp_path / "folder" / "pairs.json", tmp_path / "folder", 4, 0)
    raw = dpo_config(vlm_dir, pairs, tmp_path / "out")
    raw["method"] = method
    with pytest.raises(ValueError, match=message):
        methods.run(validate_config(raw), quiet=True)


def test_qlora_base_trains_vision_lora(tmp_path, vlm_dir, shapes_file):
    pytest.importorskip("bitsandbytes")
    raw = vision_config(vlm_dir, shapes_file, tmp_path, ["vision", "language"], max_steps=2)
    raw["model"]["quantization"] = "4bit"
    result = methods.run(validate_config(raw), quiet=True)
    weights = load_file(result.artifact / "adapter_model.safetensors")
    assert any(".language_model." in k for k in weights) and any(".visual." in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_png_jpg_and_webp_images_read_alike(tmp_path, vlm_dir, suffix):
    from PIL import Image

    from lmforge.config.model import ModelConfig
    from lmforge.models.loading import load_tokenizer

    Image.new("RGB", (56, 56), (30, 60, 220)).save(tmp_path / f"blue{suffix}")
    example = Example(
        turns=(("<image>What colour?", "blue"),), images=(tmp_path / f"blue{suffix}",), where="r#0"
    )
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(vlm_dir)))
    vision = VisionProcessor.load(str(vlm_dir), tokenizer, None, None)
    row = encode_multimodal(example, get_template("qwen2-vl"), tokenizer, vision, 128)
    assert row["input_ids"].count(vision.image_token_id) == 4


def test_qwen2_5_vl_trains_and_answers_with_the_same_code(tmp_path, shapes_file):
    from lmforge.data.templates import Conversation
    from lmforge.inference.engine import Engine, SamplingParams

    tokenizer = build_tiny_tokenizer(corpus(), vocab_size=320)
    model = build_tiny_qwen2_vl(tokenizer, family="qwen2_5_vl")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    folder = save_tiny_vlm(model, tokenizer, tmp_path / "qwen2.5-vl")
    raw = vision_config(
        folder, shapes_file, tmp_path / "out", ["vision", "projector", "language"], max_steps=2
    )
    raw["data"]["max_length"] = 128
    result = methods.run(validate_config(raw), quiet=True)
    weights = load_file(result.artifact / "adapter_model.safetensors")
    assert {part for part, marker in PART_OF.items() if any(marker in k for k in weights)} == set(PART_OF)
    engine = Engine.load(str(folder), adapter=str(result.artifact))
    image = shapes_file.parent / json.loads(shapes_file.read_text())[0]["images"][0]
    question = Conversation(turns=[("<image>What colour is the shape?", "")])
    assert len(engine.generate([question], SamplingParams(max_new_tokens=2), images=[[image]])) == 1


def test_llamafactory_multimodal_dataset_trains_as_it_is(tmp_path, vlm_dir, shapes_file):
    """LLaMA-Factory's mllm_demo layout: a dataset_info.json entry in sharegpt format whose messages
    use role/content tags, with an `images` column."""
    records = json.loads(shapes_file.read_text())[:8]
    (tmp_path / "images").mkdir()
    for r in records:
        (tmp_path / r["images"][0]).write_bytes((shapes_file.parent / r["images"][0]).read_bytes())
    (tmp_path / "mllm.json").write_text(json.dumps(records))
    info = {
        "mllm_demo": {
            "file_name": "mllm.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    raw = vision_config(vlm_dir, "mllm_demo", tmp_path / "out", max_steps=2)
    raw["data"].update(dataset_dir=str(tmp_path), max_length=128)
    result = methods.run(validate_config(raw), quiet=True)
    # the entry trains exactly as the file itself does: same losses, same adapter
    direct = vision_config(vlm_dir, tmp_path / "mllm.json", tmp_path / "direct", max_steps=2)
    direct["data"]["max_length"] = 128
    itself = methods.run(validate_config(direct), quiet=True)

    def losses(run):
        rows = (run.output_dir / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, rows) if "loss" in r and "step" in r]

    assert result.steps == 2 and len(losses(result)) == 2 and losses(result) == pytest.approx(losses(itself))
    weights = load_file(result.artifact / "adapter_model.safetensors")
    same = load_file(itself.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert all(torch.allclose(weights[k], same[k], atol=1e-6) for k in weights)


def test_data_check_counts_image_tokens_and_reports_cut_images(tmp_path, vlm_dir, shapes_file):
    from typer.testing import CliRunner

    from lmforge.cli import app

    config = tmp_path / "check.yaml"
    import yaml

    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(vlm_dir)},
                "adapter": {"method": "vision_lora"},
                "data": {"path": str(shapes_file), "template": "qwen2-vl", "max_length": 128},
                "train": {"output_dir": str(tmp_path)},
            }
        )
    )
    ok = CliRunner().invoke(app, ["data", "check", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "<|image_pad|><|image_pad|><|image_pad|><|image_pad|>" in ok.output, "shown as the model sees it"
    cut = CliRunner().invoke(app, ["data", "check", str(config), "--max-length", "30"])
    assert cut.exit_code == 1 and "images cut by max_length" in cut.output
    assert "past data.max_length=30" in cut.output
