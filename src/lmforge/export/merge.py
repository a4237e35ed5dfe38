"""Merge an adapter into its base model and save a standalone model.

Mergeable: LoRA (with DoRA, rsLoRA, PiSSA, Vision-LoRA), AdaLoRA, FourierFT, VeRA, IA3, OFT;
MoE-DoRA is refused (per-token routing has no single merged weight).

The base is always loaded unquantized, in the dtype it was saved in (16-bit for the
7B targets): merging LoRA deltas into 4-bit or 8-bit weights would re-quantize them and
lose most of what the adapter learned. A QLoRA adapter is therefore merged into the
16-bit base it was trained from; a base that is itself stored quantized is refused with
the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoConfig

from lmforge.adapters.moe_dora import is_moe_dora_folder
from lmforge.artifacts import save_artifact
from lmforge.config.model import ModelConfig
from lmforge.data.templates import pick_template
from lmforge.models.loading import (
    is_encoder_decoder,
    load_causal_lm,
    load_seq2seq_lm,
    load_tokenizer,
    model_location,
    saved_template_name,
)

console = Console(stderr=True)


# peft adapter types whose update is a fixed weight delta (or scaling) that merges exactly.
MERGEABLE_PEFT_TYPES = {"LORA", "ADALORA", "FOURIERFT", "VERA", "IA3", "OFT"}


class MergeError(ValueError):
    """The merge cannot be done as asked; the message says why and what to do."""


SHARD_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*", flags=re.IGNORECASE)


def check_shard_size(max_shard_size: str) -> None:
    """Refuse a shard size transformers cannot read, before any weights are loaded."""
    match = SHARD_SIZE.fullmatch(max_shard_size)
    if match is None or float(match.group(1)) <= 0:
        raise MergeError(
            f"max_shard_size {max_shard_size!r} is not a size; write a positive number and a unit "
            "(KB, MB, GB or TB), e.g. 5GB"
        )


def _saved_dtype(base: str, trust_remote_code: bool) -> str:
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise MergeError(
            f"the base model {base} is stored quantized ({method}): "
            "merging LoRA into quantized weights would re-quantize them and lose the adapter's effect. "
            "Pass the original 16-bit base model with --base (the one the quantized copy was made from)."
        )
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def merge_adapter(
    base: str,
    adapter: str | Path,
    out: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Merge `adapter` into `base` and save it to `out` as safetensors shards of at most
    `max_shard_size` (plus an index when there is more than one), with tokenizer, template and card."""
    check_shard_size(max_shard_size)
    adapter = Path(adapter)
    if is_moe_dora_folder(adapter):
        raise MergeError(
            f"{adapter} is a MoE-DoRA adapter, which cannot be merged: each token is routed to its own "
            "experts, so the weight update depends on the input and no single merged weight reproduces "
            f"it. Use it as an adapter: lmforge chat --model {base} --adapter {adapter}"
        )
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_config.get("peft_type", "LORA") not in MERGEABLE_PEFT_TYPES:
        raise MergeError(
            f"{adapter}: adapter type {adapter_config['peft_type']} cannot be merged (mergeable: "
            f"{', '.join(sorted(MERGEABLE_PEFT_TYPES))}); use it as an adapter over the base"
        )
    dtype = _saved_dtype(base, trust_remote_code) if dtype == "auto" else dtype
    console.print(f"merging {adapter} into {base} ({dtype}, unquantized)")
    model_config = ModelConfig(
        name_or_path=base,
        dtype=dtype,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        trust_remote_code=trust_remote_code,
    )
    loader = load_seq2seq_lm if is_encoder_decoder(model_config) else load_causal_lm
    model, _ = loader(model_config, for_training=False, quiet=True)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(
        ModelConfig(name_or_path=tokenizer_source, trust_remote_code=trust_remote_code)
    )
    template = pick_template(
        None, [saved_template_name(str(adapter)), saved_template_name(base)], tokenizer, base
    )
    card = f"Merged from base `{base}` and adapter `{adapter}` in {dtype}."
    image_processor = None
    if (
        getattr(model.config, "vision_config", None) is not None
    ):  # a vision-language model keeps its image processor
        from transformers import AutoImageProcessor

        source = str(adapter) if (adapter / "preprocessor_config.json").is_file() else model_location(base)
        image_processor = AutoImageProcessor.from_pretrained(source)
    return save_artifact(
        merged,
        tokenizer,
        template,
        Path(out),
        "merged model",
        card_extra=card,
        image_processor=image_processor,
        max_shard_size=max_shard_size,
    )
