"""vision_lora: LoRA on a vision-language model's vision tower only; the language model stays frozen."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from lmforge.adapters.build import attach_adapter
from lmforge.config.adapter import AdapterConfig

IMAGE, START, END = 300, 302, 303


@pytest.fixture
def tiny_qwen2_vl():
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 320,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=IMAGE,
        video_token_id=301,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    return Qwen2VLForConditionalGeneration(config)


def image_batch():
    # one 28x28 image: a 2x2 grid of 14-pixel patches, merged 2x2 into one image token
    pixel_values = torch.randn(4, 3 * 2 * 14 * 14)
    input_ids = torch.tensor([[START, IMAGE, END, 10, 11, 12, 13]])
    labels = torch.tensor([[-100, -100, -100, 10, 11, 12, 13]])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
        "mm_token_type_ids": (input_ids == IMAGE).long(),  # 1 marks image tokens (for M-RoPE)
    }


def test_vision_lora_trains_the_vision_tower_only(tiny_qwen2_vl, tmp_path):
    tiny_qwen2_vl.save_pretrained(tmp_path / "base")
    config = AdapterConfig(method="vision_lora", r=4)
    model = attach_adapter(tiny_qwen2_vl, config, gradient_checkpointing=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".visual." in n and "lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = image_batch()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the vision adapter alone moves the caption loss
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "vision")
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "vision").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(reloaded.merge_and_unload()(**batch).logits, expected, atol=1e-4, rtol=0)


def test_vision_lora_layer_and_preset_selection(tiny_qwen2_vl):
    config = AdapterConfig(method="vision_lora", r=4, preset="attention_only", layers="top:1")
    model = attach_adapter(tiny_qwen2_vl, config, gradient_checkpointing=False)
    wrapped = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped == {
        "base_model.model.model.visual.blocks.1.attn.qkv",
        "base_model.model.model.visual.blocks.1.attn.proj",
    }
