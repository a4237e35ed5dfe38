"""Load tokenizers and causal language models from a local folder or a hub id."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import lmforge.lab  # noqa: F401  (registers lab models with the Auto classes)
from lmforge.config.model import ModelConfig
from lmforge.models.hardware import Hardware, choose_hardware

console = Console(stderr=True)

TEMPLATE_FILE = "lmforge_template.txt"  # the lmforge template name saved beside a model


def model_location(name_or_path: str) -> str:
    """A local folder, or a hub id; a path-like name that does not exist is one clear error
    (instead of the hub client's complaint about repo id syntax)."""
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise OSError(
            f"model folder {name_or_path} does not exist; check model.name_or_path (a local folder, "
            "or a hub id like Qwen/Qwen2.5-0.5B-Instruct)"
        )
    return name_or_path


def is_vision_language(config: ModelConfig) -> bool:
    """Whether the model has a vision tower (its config has a `vision_config`), read from config.json."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(
        model_location(config.name_or_path),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    return getattr(model_config, "vision_config", None) is not None


def uses_alibi(config: ModelConfig) -> bool:
    """Whether the model is a lab model with ALiBi (its bias needs SDPA or eager attention)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(
        model_location(config.name_or_path),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
    )
    return getattr(model_config, "position_type", None) == "alibi"


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


def saved_template_name(name_or_path: str) -> str | None:
    path = Path(name_or_path) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def quantization_config(config: ModelConfig, hardware: Hardware):  # -> BitsAndBytesConfig | None
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
        # Keep 4-bit storage dtype consistent on CPU, where bf16 compute may be unavailable.
        bnb_4bit_quant_storage=torch.uint8,
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
    """Loading a causal LM as a classifier drops `lm_head` and adds `score`: transformers reports
    both as a warning table; for a reward model that is the intent, so keep it quiet."""
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
) -> tuple[PreTrainedModel, Hardware]:
    """Load the model with the hardware choice applied; KV cache off for training, on otherwise.

    `reward=True` loads it as a sequence classifier with one output (a reward model: the
    backbone's weights plus a new scalar head, `score`).
    """
    hardware = hardware or choose_hardware(config)
    if not quiet:
        console.print(f"[bold]hardware[/]: {hardware.describe()}")
    quant = quantization_config(config, hardware)
    auto_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    if not reward and is_vision_language(config):
        from transformers import AutoModelForImageTextToText

        auto_class = AutoModelForImageTextToText
    extra: dict = {"num_labels": 1} if reward else {}
    attention = hardware.attn_implementation
    if attention.startswith("flash") and uses_alibi(config):
        attention = "sdpa"  # flash-attn kernels take no ALiBi bias through transformers
    if quant is not None:
        # Only when asked: an explicit `quantization_config=None` would overwrite the config.json
        # entry of a checkpoint saved quantized and load its packed weights as garbage.
        extra["quantization_config"] = quant
    with expected_head_swap() if reward else nullcontext():
        model = auto_class.from_pretrained(
            model_location(config.name_or_path),
            **extra,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            dtype=hardware.dtype,
            attn_implementation=attention,
            device_map={"": hardware.device} if quant is not None else None,
            use_safetensors=True,
        )
    if quant is None:
        model.to(hardware.device)
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
