"""Build a peft LoRA config from `adapter:` and attach it; presets pick the target modules."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import PreTrainedModel

from lmforge.config.adapter import AdapterConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
# Other common names for the same roles (GPT-2/Falcon/Phi style), matched when present.
ATTENTION_ALT = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "dense", "c_proj", "out_proj")
FFN_ALT = ("fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj", "w1", "w2", "w3")


def _linear_names(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or module.__class__.__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        ):
            names.add(name.rsplit(".", 1)[-1])
    return names - {"lm_head", "score", "classifier"}


def target_modules(config: AdapterConfig, model: nn.Module) -> list[str]:
    """Module-name suffixes to wrap, checked against the model's linear layers."""
    present = _linear_names(model)
    wanted: tuple[str, ...]
    if config.preset == "custom":
        missing = [m for m in config.target_modules if m not in present]
        if missing:
            raise ValueError(
                f"adapter.target_modules {missing} are not linear layers of this model; "
                f"its linear layers are: {', '.join(sorted(present))}"
            )
        return list(config.target_modules)
    if config.preset == "minimal":
        wanted = ("q_proj", "v_proj", "query", "value")
    elif config.preset == "attention_only":
        wanted = ATTENTION + ATTENTION_ALT
    elif config.preset == "ffn_only":
        wanted = FFN + FFN_ALT
    else:
        return sorted(present)
    found = sorted(n for n in present if n in wanted)
    if not found:
        raise ValueError(
            f"adapter.preset `{config.preset}` found no matching layers in this model; its linear layers are "
            f"{', '.join(sorted(present))}: use preset: custom with target_modules"
        )
    return found


def attach_lora(model: PreTrainedModel, config: AdapterConfig, gradient_checkpointing: bool) -> PeftModel:
    """Wrap `model` with a trainable LoRA adapter (QLoRA when the base is quantized)."""
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if config.path:
        return PeftModel.from_pretrained(model, config.path, is_trainable=True)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules(config, model),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, lora)
