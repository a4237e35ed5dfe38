"""models/loading: what is read from a checkpoint's config before any weight loads."""

from __future__ import annotations

import json
import shutil

import pytest

from lmforge.config.model import ModelConfig
from lmforge.models.loading import adapter_base, check_full_finetune, stored_quantization


def stored_quantized(base_dir, tmp_path, quant: dict):
    """The tiny Llama with a quantization_config in its config.json, as a pre-quantized hub copy."""
    folder = tmp_path / quant["quant_method"]
    shutil.copytree(base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    return ModelConfig(name_or_path=str(folder))


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4, "group_size": 128},
    ],
)
def test_full_finetuning_a_checkpoint_stored_quantized_is_refused_with_the_fix(base_dir, tmp_path, quant):
    model = stored_quantized(base_dir, tmp_path, quant)
    assert stored_quantization(model) == quant["quant_method"]
    with pytest.raises(ValueError) as err:
        check_full_finetune(model, "none")
    message = str(err.value)
    assert f"model.name_or_path {model.name_or_path} is stored quantized ({quant['quant_method']}" in message
    assert "full fine-tuning cannot update quantized weights" in message
    assert "adapter.method: lora" in message and "16-bit model it was made from" in message
    check_full_finetune(model, "lora")  # an adapter over the quantized base (QLoRA) trains


def test_an_unquantized_checkpoint_fine_tunes_fully(base_dir):
    model = ModelConfig(name_or_path=str(base_dir))
    assert stored_quantization(model) is None
    check_full_finetune(model, "none")


def test_an_adapter_folder_names_its_base(tmp_path, base_dir):
    folder = tmp_path / "adapter"
    folder.mkdir()
    assert adapter_base(folder) is None, "not an adapter folder"
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base_dir)}))
    assert adapter_base(folder) == str(base_dir)
    assert adapter_base(folder, "other/base") == "other/base", "a base given wins"
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="adapter_config.json names no base model; pass it with --base"):
        adapter_base(folder)
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "moe_dora_config.json").write_text(json.dumps({"base_model": "org/base"}))
    assert adapter_base(moe) == "org/base"
