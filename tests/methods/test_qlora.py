"""QLoRA: LoRA on a bitsandbytes-quantized base, on CPU (bitsandbytes' CPU backend)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import sft_config
from lmforge.adapters.build import attach_adapter
from lmforge.config import validate_config
from lmforge.methods import sft
from lmforge.models.loading import load_causal_lm

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("bits", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_qlora_quantizes_base_and_trains_adapter(tmp_path, base_dir, alpaca_file, bits, layer):
    config = validate_config(sft_config(base_dir, alpaca_file, tmp_path / bits, max_steps=4))
    config.model.quantization = bits
    model, _ = load_causal_lm(config.model, quiet=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    peft_model = attach_adapter(model, config.adapter, gradient_checkpointing=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    result = sft.run(config, quiet=True)
    assert torch.isfinite(torch.tensor(result.train_loss))
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
