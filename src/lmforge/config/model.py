"""`model:` — which model to load, and how (device, dtype, attention, quantization)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import Section


class ModelConfig(Section):
    name_or_path: str = Field(
        "",
        description="Local folder or hub id of the base model (e.g. meta-llama/Llama-2-7b-chat-hf).",
    )
    arch: str | None = Field(
        None,
        description="Pre-training from scratch: a `lmforge lab` architecture YAML; the model is built "
        "from it with random weights instead of loaded (leave name_or_path empty).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model. Off unless you trust its source."
    )
    device: Literal["auto", "cpu", "cuda", "xpu"] = Field(
        "auto", description="Where to run: auto picks cuda when available, else cpu; xpu: an Intel GPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype: auto = bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU.",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel: auto = flash_attention_2 if installed on CUDA, else sdpa.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the base quantized with bitsandbytes (QLoRA = 4bit + a LoRA adapter).",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
