"""Quantize a full 16-bit model into a standalone quantized checkpoint.

* bnb-4bit: bitsandbytes NF4 (or FP4) with optional double quantization, the storage format
  of QLoRA (Dettmers et al., 2023); bnb-8bit: LLM.int8() (Dettmers et al., 2022). Both round
  each weight block on its own, without data: the model is loaded through transformers'
  `BitsAndBytesConfig` and saved pre-quantized, so loading it later needs bitsandbytes but no
  quantization step. Both run on CPU too (bitsandbytes' CPU backend) and on CUDA. On a CPU with
  AVX512-BF16, bitsandbytes runs 4-bit layers through a packed kernel that needs each layer's
  output size to be a multiple of 32 and its input size a multiple of the quantization block
  (64); a model with other sizes (an intermediate size of 688, say) quantizes but cannot generate
  there, so quantizing it on such a machine warns, naming the layers and the fix.
* gptq: GPTQ (Frantar et al., 2023) chooses each layer's rounding to minimise its output error
  on calibration activations. It runs through the optional `gptqmodel` package
  (`pip install 'lmforge[gptq]'`) on a CUDA GPU; the calibration text is rendered from an
  lmforge data file through the model's chat template, so the activations look like the ones
  the model will see.

The source must be a full model stored unquantized: an adapter folder is refused (merge it
first), and so is a checkpoint that is already quantized (quantizing rounded weights again
compounds the error). Everything is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from lmforge.adapters.moe_dora import is_moe_dora_folder
from lmforge.artifacts import atomic_folder, versions
from lmforge.data.formats import Example
from lmforge.data.templates import AnyTemplate, pick_template
from lmforge.models.hardware import DTYPES
from lmforge.models.loading import TEMPLATE_FILE, quiet_library_bars, saved_template_name
from lmforge.models.location import model_location

console = Console(stderr=True)

QUANT_METHODS = ("bnb-4bit", "bnb-8bit", "gptq")
GPTQ_BITS = (2, 3, 4, 8)


class QuantizeError(ValueError):
    """The model cannot be quantized as asked; the message says why and what to do."""


def _check_options(
    method: str,
    quant_type: str,
    compute_dtype: str,
    calibration: str | None,
    bits: int,
    group_size: int,
    calibration_samples: int,
) -> None:
    if method not in QUANT_METHODS:
        raise QuantizeError(
            f"unknown quantization method {method!r}; choose one of {', '.join(QUANT_METHODS)}"
        )
    if method == "gptq":
        if calibration is None:
            raise QuantizeError(
                "gptq needs calibration data: pass a data file lmforge reads (e.g. the SFT training data) "
                "as calibration; or use method bnb-4bit, which needs none"
            )
        if bits not in GPTQ_BITS:
            raise QuantizeError(f"gptq bits is {bits}; choose one of {', '.join(map(str, GPTQ_BITS))}")
        if group_size != -1 and group_size <= 0:
            raise QuantizeError(
                f"gptq group_size is {group_size}; use a positive size (e.g. 128) or -1 (per row)"
            )
        if calibration_samples <= 0:
            raise QuantizeError(
                f"calibration_samples is {calibration_samples}; use a positive count (e.g. 128)"
            )
        return
    if calibration is not None:
        raise QuantizeError(
            f"{method} quantizes without data, so calibration ({calibration}) would be ignored; "
            "drop it, or use method gptq to calibrate on it"
        )
    if method == "bnb-4bit" and quant_type not in ("nf4", "fp4"):
        raise QuantizeError(f"bnb-4bit quant_type is {quant_type!r}; choose nf4 or fp4")
    if method == "bnb-4bit" and compute_dtype not in DTYPES:
        raise QuantizeError(f"compute_dtype is {compute_dtype!r}; choose one of {', '.join(DTYPES)}")


def _check_source(model_dir: str | Path) -> str:
    """The model's location, once it is known to be a full, unquantized, text-only model."""
    source = model_location(str(model_dir))
    folder = Path(source)
    if is_moe_dora_folder(folder):
        raise QuantizeError(
            f"{folder} is a MoE-DoRA adapter, which cannot be merged into a standalone model to quantize; "
            "load its base quantized instead (model.quantization: 4bit) with the adapter on top"
        )
    if (folder / "adapter_config.json").is_file():
        raise QuantizeError(
            f"{folder} is an adapter folder, not a full model; merge it first "
            f"(lmforge merge --base BASE --adapter {folder} --out MERGED) and quantize the merged folder"
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise QuantizeError(
            f"{folder} is not a model folder (no config.json); pass a full 16-bit model folder"
        )
    config = AutoConfig.from_pretrained(source)
    quant = getattr(config, "quantization_config", None)
    if quant:
        kind = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise QuantizeError(
            f"{source} is already quantized ({kind}; config.json has a quantization_config): quantizing it "
            "again would compound the rounding error. Quantize the 16-bit model it was made from"
        )
    if getattr(config, "vision_config", None) is not None:
        raise QuantizeError(
            f"{source} is a vision-language model; lmforge quantize handles text-only causal LMs. "
            "Load it quantized on the fly instead (model.quantization: 4bit)"
        )
    return source


def _require_gptq() -> None:
    if importlib.util.find_spec("gptqmodel") is None:
        raise QuantizeError(
            "gptq needs the gptqmodel package, which is not installed: pip install 'lmforge[gptq]' "
            "(on a machine with a CUDA GPU); or use method bnb-4bit, which needs no extra package"
        )
    if not torch.cuda.is_available():
        raise QuantizeError(
            "gptq quantization runs on a CUDA GPU and none is visible; run it on a GPU machine, "
            "or use method bnb-4bit, which also runs on CPU"
        )


def calibration_texts(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, template: AnyTemplate, samples: int
) -> list[str]:
    """The first `samples` records as the text the model reads: a text record as is, a chat
    record rendered through the template (a prompt-only one up to where the answer starts)."""
    texts = []
    for example in examples:
        if example.text is not None:
            text = example.text
        elif example.response:
            text = template.render(example.conversation(), tokenizer)
        else:
            text = template.generation_prompt(example.conversation(), tokenizer)
        if text.strip():
            texts.append(text)
        if len(texts) == samples:
            break
    return texts


def _read_calibration(
    calibration: str, source: str, tokenizer: PreTrainedTokenizerBase, samples: int
) -> list[str]:
    from lmforge.inference.predict import read_examples

    template = pick_template(None, [saved_template_name(source)], tokenizer, source)
    texts = calibration_texts(read_examples(calibration), tokenizer, template, samples)
    if not texts:
        raise QuantizeError(
            f"calibration data {calibration} has no text to calibrate on; pass records with text"
        )
    return texts


def _describe(
    method: str, quant_type: str, double_quant: bool, compute_dtype: str, bits: int, group_size: int
) -> str:
    if method == "bnb-4bit":
        double = ", double quantization" if double_quant else ""
        return f"bitsandbytes 4-bit {quant_type}{double}, compute dtype {compute_dtype}"
    if method == "bnb-8bit":
        return "bitsandbytes 8-bit (LLM.int8())"
    return f"GPTQ {bits}-bit, group size {group_size} (gptqmodel)"


def _model_card(source: str, method: str, description: str, calibration: str | None, samples: int) -> str:
    library = "bitsandbytes" if method.startswith("bnb") else "gptqmodel"
    found = {**versions(), library: _version(library)}
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {source}",
        f"tags: [lmforge, quantized, {library}]",
        "---",
        "# lmforge quantized model",
        "",
        f"- source: `{source}` (unquantized)",
        f"- method: `{method}` — {description}",
    ]
    if calibration is not None:
        lines.append(f"- calibration: `{calibration}` ({samples} records)")
    lines += [
        f"- loading it needs `{library}`; transformers reads the quantization from config.json",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in found.items()),
    ]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# bitsandbytes' packed CPU 4-bit layout groups output rows in blocks of 32
# (`bitsandbytes.functional._convert_weight_packed_for_cpu`, its `block_n`): it asserts
# "N must be divisible by block_n", and its absmax reshape needs the input size to be a multiple
# of the quantization block size.
CPU_4BIT_ROWS = 32


def cpu_4bit_blockers(shapes: dict[str, tuple[int, int, int]]) -> list[str]:
    """What stops bitsandbytes' packed CPU 4-bit kernel from running each layer, given each 4-bit
    layer's (output size, input size, quantization block size) by name: one line per kind of layer
    (layer numbers as `*`), empty when every layer runs."""
    found: dict[str, str] = {}
    for name, (rows, columns, block) in shapes.items():
        why = []
        if rows % CPU_4BIT_ROWS:
            why.append(f"output size {rows} is not a multiple of {CPU_4BIT_ROWS}")
        if columns % block:
            why.append(f"input size {columns} is not a multiple of the block size {block}")
        if why:
            found.setdefault(re.sub(r"\.\d+\.", ".*.", name), ", ".join(why))
    return [f"{name} ({why})" for name, why in found.items()]


def _4bit_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """Each bitsandbytes 4-bit layer's (output size, input size, block size), by name."""
    shapes = {}
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and len(state.shape) == 2:
            shapes[name] = (int(state.shape[0]), int(state.shape[1]), int(state.blocksize))
    return shapes


def packed_cpu_4bit(device: str) -> bool:
    """Whether 4-bit layers run through bitsandbytes' packed CPU kernel on `device` (a CPU with
    AVX512-BF16: bitsandbytes' own test, `has_avx512bf16`)."""
    if device != "cpu":
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def warn_cpu_4bit(model: torch.nn.Module, device: str) -> list[str]:
    """Warn (once, always shown) when the 4-bit `model` cannot generate on this device; returns the
    layers that stop it."""
    blockers = cpu_4bit_blockers(_4bit_shapes(model)) if packed_cpu_4bit(device) else []
    if blockers:
        console.print(
            "[yellow]warning[/]: this 4-bit model cannot generate on this machine's CPU. bitsandbytes' "
            f"CPU 4-bit kernel (AVX512-BF16) needs each layer's output size to be a multiple of "
            f"{CPU_4BIT_ROWS} and its input size a multiple of the quantization block size; here "
            + "; ".join(blockers)
            + '. Generating here would fail ("N must be divisible by block_n", or a reshape error). The '
            "model is saved and runs on a CUDA GPU; to run on this CPU, quantize with method bnb-8bit, or "
            "export the 16-bit model to GGUF (lmforge export) for llama.cpp",
            soft_wrap=True,
        )
    return blockers


def _quantize_bnb(
    source: str, dest: Path, method: str, quant_type: str, double_quant: bool, compute_dtype: str
) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "bnb-8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=DTYPES[compute_dtype],
            bnb_4bit_quant_storage=torch.uint8,  # as lmforge's QLoRA loading: one layout on CPU and CUDA
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # dtype "auto": the layers bitsandbytes leaves alone (embeddings, norms, head) keep their saved dtype.
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, dtype="auto", device_map={"": device}
    )
    if method == "bnb-4bit":
        warn_cpu_4bit(model, device)
    model.save_pretrained(dest, safe_serialization=True)


def _quantize_gptq(source: str, dest: Path, texts: list[str], bits: int, group_size: int) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig  # the documented entry points of gptqmodel

    model = GPTQModel.load(source, QuantizeConfig(bits=bits, group_size=group_size))
    model.quantize(texts, batch_size=1)
    model.save(str(dest))


def quantize_model(
    model_dir: str | Path,
    out: str | Path,
    method: str = "bnb-4bit",
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    calibration: str | None = None,
    bits: int = 4,
    group_size: int = 128,
    calibration_samples: int = 128,
    quiet: bool = True,
) -> Path:
    """Quantize the full model in `model_dir` with `method` (bnb-4bit, bnb-8bit or gptq) and save
    it to `out` (safetensors + tokenizer + lmforge template + model card); returns `out`.

    bnb-4bit reads quant_type, double_quant and compute_dtype; gptq reads calibration (a data
    file), calibration_samples, bits and group_size, and needs gptqmodel and a CUDA GPU.
    """
    _check_options(method, quant_type, compute_dtype, calibration, bits, group_size, calibration_samples)
    source = _check_source(model_dir)
    out = Path(out)
    if Path(source).exists() and out.resolve() == Path(source).resolve():
        raise QuantizeError(f"out is the source folder {source}; write the quantized model to a new folder")
    if method == "gptq":
        _require_gptq()
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts: list[str] = []
    if method == "gptq":
        texts = _read_calibration(str(calibration), source, tokenizer, calibration_samples)
    description = _describe(method, quant_type, double_quant, compute_dtype, bits, group_size)
    if not quiet:
        console.print(f"quantizing {source} -> {out}: {description}")
    with quiet_library_bars() if quiet else nullcontext(), atomic_folder(out) as tmp:
        if method == "gptq":
            _quantize_gptq(source, tmp, texts, bits, group_size)
        else:
            _quantize_bnb(source, tmp, method, quant_type, double_quant, compute_dtype)
        tokenizer.save_pretrained(tmp)
        template_file = Path(source) / TEMPLATE_FILE
        if template_file.is_file():
            shutil.copyfile(template_file, tmp / TEMPLATE_FILE)
        card = _model_card(source, method, description, calibration, len(texts))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out
