"""Load tokenizers and models of every kind lmforge trains from a local folder or a hub id.

Kinds: causal LMs (and vision-language models), encoder-decoder (seq2seq) LMs such as T5 and
MarianMT, masked LMs (BERT family) and sequence classifiers. Each loads with the same hardware
choice (device, dtype, attention) and quantization (bitsandbytes) handling.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from transformers import (
    MODEL_FOR_MASKED_LM_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import lmforge.lab  # noqa: F401  (registers lab models with the Auto classes)
from lmforge.artifacts import TEMPLATE_FILE
from lmforge.config.model import ModelConfig
from lmforge.distributed import device_for
from lmforge.models.hardware import Hardware, choose_hardware
from lmforge.models.location import model_location

console = Console(stderr=True)


def auto_config(config: ModelConfig) -> PretrainedConfig:
    """The model's config.json (no weights are read)."""
    return AutoConfig.from_pretrained(
        model_location(config.name_or_path),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )


def stored_quantization(config: ModelConfig) -> str | None:
    """How a checkpoint is stored quantized (its config.json's quantization_config: bitsandbytes,
    gptq, awq, ...), or None for an unquantized one. Only the config is read."""
    quant = getattr(auto_config(config), "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown method")


def check_full_finetune(config: ModelConfig, adapter_method: str) -> None:
    """Refuse to train every weight (`adapter.method: none`) of a checkpoint stored quantized, before
    any weight loads: quantized weights take no gradient updates. (`model.quantization` with no
    adapter is refused by the config schema; this is the checkpoint that is quantized already.)"""
    if adapter_method != "none" or config.arch:
        return
    method = stored_quantization(config)
    if method is not None:
        raise ValueError(
            f"model.name_or_path {config.name_or_path} is stored quantized ({method}: its config.json has "
            "a quantization_config) and adapter.method is none, but full fine-tuning cannot update "
            "quantized weights; train an adapter on it (adapter.method: lora, as QLoRA does) or "
            "fine-tune the 16-bit model it was made from"
        )


def is_vision_language(config: ModelConfig) -> bool:
    """Whether the model has a vision tower (its config has a `vision_config`), read from config.json."""
    return getattr(auto_config(config), "vision_config", None) is not None


def is_encoder_decoder(config: ModelConfig) -> bool:
    """Whether the model is an encoder-decoder (seq2seq: T5, MarianMT, BART), read from config.json."""
    return bool(getattr(auto_config(config), "is_encoder_decoder", False))


def has_masked_lm_head(config: ModelConfig) -> bool:
    """Whether transformers has a masked-LM class for this model type (BERT, RoBERTa, DeBERTa, ...)."""
    return type(auto_config(config)) in MODEL_FOR_MASKED_LM_MAPPING


def model_type(config: ModelConfig) -> str:
    return str(getattr(auto_config(config), "model_type", "") or "unknown")


def uses_alibi(config: ModelConfig) -> bool:
    """Whether the model is a lab model with ALiBi (its bias needs SDPA or eager attention)."""
    return getattr(auto_config(config), "position_type", None) == "alibi"


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        model_location(config.name_or_path),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        # Llama-2 and Mistral ship no pad token. Labels are padded with -100 by the collator, so
        # borrowing UNK (or EOS) for padding never masks a real EOS from the loss.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def adapter_base(folder: str | Path, base: str | None = None, fix: str = "pass it with --base") -> str | None:
    """The base model of an adapter folder: `base` when given, else the one its adapter_config.json
    (peft) or moe_dora_config.json names; None when `folder` is not an adapter folder. An adapter
    that names no base is a ValueError ending with `fix`."""
    from lmforge.adapters.moe_dora import CONFIG_FILE as MOE_DORA_CONFIG

    for name, key in (("adapter_config.json", "base_model_name_or_path"), (MOE_DORA_CONFIG, "base_model")):
        config = Path(folder) / name
        if not config.is_file():
            continue
        if base:
            return base
        named = json.loads(config.read_text(encoding="utf-8")).get(key)
        if not named:
            raise ValueError(f"{config} names no base model; {fix}")
        return str(named)
    return None


def saved_template_name(name_or_path: str) -> str | None:
    path = Path(name_or_path) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def quantization_config(config: ModelConfig, hardware: Hardware, sharded: bool = False):
    """bitsandbytes' config for model.quantization (None without). 4-bit weights are stored as
    uint8 (one layout on CPU and CUDA), or in the compute dtype when FSDP2 or ZeRO-3 shards them
    (`sharded`): they flatten and split only along with the 16-bit parameters around them."""
    if config.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=hardware.dtype,
        bnb_4bit_quant_storage=hardware.dtype if sharded else torch.uint8,
    )


@contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Hide the libraries' per-file progress bars (weights loading, dataset maps) inside this block,
    for commands whose output is lmforge's own (small local models load in a blink)."""
    import datasets
    from transformers.utils import logging as hf_logging

    was_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:  # back to how it was: a nested block leaves its outer block quiet
        if was_on[0]:
            datasets.enable_progress_bars()
        if was_on[1]:
            hf_logging.enable_progress_bar()


@contextmanager
def expected_head_swap() -> Iterator[None]:
    """Loading a causal LM as a classifier drops `lm_head` and adds `score` (a BERT checkpoint as a
    classifier: its MLM head out, `classifier` in): transformers reports both as a warning table;
    for a reward model or a classifier that is the intent, so keep it quiet."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_causal_lm(
    config: ModelConfig,
    for_training: bool = True,
    hardware: Hardware | None = None,
    quiet: bool = False,
    reward: bool = False,
    sharded: bool = False,
) -> tuple[PreTrainedModel, Hardware]:
    """Load the model with the hardware choice applied; KV cache off for training, on otherwise.

    `reward=True` loads it as a sequence classifier with one output (a reward model: the
    backbone's weights plus a new scalar head, `score`). `sharded`: FSDP2 or ZeRO-3 will shard
    it (see `quantization_config`).
    """
    if is_encoder_decoder(config):
        raise ValueError(
            f"{config.name_or_path} is an encoder-decoder model (T5, MarianMT, BART): this stage trains "
            "decoder-only (causal) models; encoder-decoders train with method.name sft (seq2seq) or "
            "classify"
        )
    auto_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    if not reward and is_vision_language(config):
        from transformers import AutoModelForImageTextToText

        auto_class = AutoModelForImageTextToText
    extra: dict = {"num_labels": 1} if reward else {}
    return _load(config, auto_class, for_training, hardware, quiet, extra, reward, sharded)


def load_seq2seq_lm(
    config: ModelConfig,
    for_training: bool = True,
    hardware: Hardware | None = None,
    quiet: bool = False,
) -> tuple[PreTrainedModel, Hardware]:
    """An encoder-decoder LM (T5, MarianMT, BART) through AutoModelForSeq2SeqLM, loaded like
    `load_causal_lm` (hardware, quantization, KV cache off for training)."""
    return _load(config, AutoModelForSeq2SeqLM, for_training, hardware, quiet, {})


def load_masked_lm(
    config: ModelConfig, hardware: Hardware | None = None, quiet: bool = False
) -> tuple[PreTrainedModel, Hardware]:
    """A masked LM (BERT family) through AutoModelForMaskedLM, loaded like `load_causal_lm` (a
    pre-training checkpoint's pooler and next-sentence head are left out, quietly)."""
    return _load(config, AutoModelForMaskedLM, True, hardware, quiet, {}, head_swap=True)


def load_classifier(
    config: ModelConfig,
    labels: list[str],
    hardware: Hardware | None = None,
    quiet: bool = False,
) -> tuple[PreTrainedModel, Hardware]:
    """A sequence classifier with one output per label (`labels[i]` names class id i, saved in the
    config as id2label/label2id): an encoder (BERT's `classifier` head on the pooled [CLS]) or a
    causal LM (a `score` head on the last non-pad token). A head of another size is made new."""
    extra = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "ignore_mismatched_sizes": True,
    }
    return _load(config, AutoModelForSequenceClassification, True, hardware, quiet, extra, head_swap=True)


# The public auto mappings, to look up the class a config loads as (for its attention support).
_MAPPINGS = {
    AutoModelForSeq2SeqLM: MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    AutoModelForMaskedLM: MODEL_FOR_MASKED_LM_MAPPING,
    AutoModelForSequenceClassification: MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
}


def _attention(config: ModelConfig, hardware: Hardware, auto_class: type) -> str:
    """The chosen attention kernel, or the best one this model class supports (T5 has no
    flash-attn path; a lab model with ALiBi needs its bias, which flash kernels do not take)."""
    attention = hardware.attn_implementation
    if not attention.startswith("flash"):
        return attention
    if uses_alibi(config):
        return "sdpa"
    mapping = _MAPPINGS.get(auto_class)
    model_config = auto_config(config)
    if mapping is None or type(model_config) not in mapping:
        return attention
    model_class = mapping[type(model_config)]
    if getattr(model_class, "_supports_flash_attn", False):
        return attention
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _load(
    config: ModelConfig,
    auto_class: type,
    for_training: bool,
    hardware: Hardware | None,
    quiet: bool,
    extra: dict,
    head_swap: bool = False,
    sharded: bool = False,
) -> tuple[PreTrainedModel, Hardware]:
    """`auto_class.from_pretrained` with the hardware choice and quantization applied; the KV
    cache off for training, on otherwise."""
    hardware = hardware or choose_hardware(config)
    if not quiet:
        console.print(f"[bold]hardware[/]: {hardware.describe()}")
    quant = quantization_config(config, hardware, sharded)
    extra = dict(extra)
    if quant is not None:
        # Only when asked: an explicit `quantization_config=None` would overwrite the config.json
        # entry of a checkpoint saved quantized and load its packed weights as garbage.
        extra["quantization_config"] = quant
    with expected_head_swap() if head_swap else nullcontext():
        model = auto_class.from_pretrained(
            model_location(config.name_or_path),
            **extra,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            dtype=hardware.dtype,
            attn_implementation=_attention(config, hardware, auto_class),
            device_map={"": device_for(hardware.device)} if quant is not None else None,
            use_safetensors=True,
        )
    if quant is None:
        model.to(device_for(hardware.device))  # this process's own GPU when several run
    model.config.use_cache = not for_training
    return model, hardware


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted at their real size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def arch_tokenizer(arch: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a lab architecture YAML names."""
    from lmforge.lab.spec import load_arch

    return load_tokenizer(ModelConfig(name_or_path=load_arch(arch).tokenizer))
