"""One decision, made in one place: which device, dtype and attention kernel to use.

`choose_hardware` turns `model:` into a device, dtype and attention kernel. With `hardware: auto`
the config itself is filled in first: `probe_hardware` reads the machine (and the model's size,
without loading its weights), `auto_hardware` decides — a pure function of the config and the
probe, so the decision table is tested with fake probes — and `apply_hardware` prints each
decision with its reason and keeps them for `hardware.json`. Keys the user changed from their
defaults are kept; only `auto`/`none`/the default optimizer are decided (see docs/hardware.md).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config.model import ModelConfig

if TYPE_CHECKING:
    from lmforge.config import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    device: str
    dtype: torch.dtype
    attn_implementation: str
    reasons: list[str] = field(default_factory=list)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"device={self.device} dtype={dtype} attention={self.attn_implementation} ("
            + "; ".join(self.reasons)
            + ")"
        )


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_hardware(config: ModelConfig) -> Hardware:
    """CUDA -> bf16 if supported else fp16, flash-attn 2 if installed else SDPA; CPU -> fp32.
    An Intel GPU is used when asked for (model.device: xpu, which `hardware: auto` sets)."""
    reasons: list[str] = []
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise RuntimeError("model.device is cuda but no CUDA device is visible; use model.device: auto")
    if config.device == "xpu" and not torch.xpu.is_available():
        raise RuntimeError("model.device is xpu but no Intel XPU device is visible; use model.device: auto")
    if config.device == "xpu":
        device = "xpu"
        reasons.append("asked for xpu")
    else:
        device = "cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu"
        reasons.append(
            "CUDA available" if device == "cuda" else "no CUDA device" if not cuda else "asked for cpu"
        )

    if config.dtype != "auto":
        dtype = DTYPES[config.dtype]
        reasons.append(f"dtype {config.dtype} from config")
    elif device == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
        reasons.append("GPU supports bf16")
    elif device == "cuda":
        dtype = torch.float16
        reasons.append("GPU lacks bf16, using fp16")
    elif device == "xpu" and torch.xpu.is_bf16_supported():
        dtype = torch.bfloat16
        reasons.append("XPU supports bf16")
    else:
        dtype = torch.float32
        reasons.append("fp32 on CPU" if device == "cpu" else "XPU lacks bf16, using fp32")

    if config.attn_implementation != "auto":
        attn = config.attn_implementation
        if attn == "flash_attention_2" and not (device == "cuda" and flash_attn_available()):
            raise RuntimeError(
                "model.attn_implementation is flash_attention_2 but flash-attn is not installed or no GPU is "
                "present; install it with `pip install lmforge[gpu]` or use attn_implementation: auto"
            )
        reasons.append(f"attention {attn} from config")
    elif device == "cuda" and flash_attn_available() and dtype != torch.float32:
        attn = "flash_attention_2"
        reasons.append("flash-attn installed")
    else:
        attn = "sdpa"
        reasons.append("SDPA (flash-attn not installed)" if device == "cuda" else f"SDPA on {device.upper()}")
    return Hardware(device=device, dtype=dtype, attn_implementation=attn, reasons=reasons)


# --- hardware: auto -------------------------------------------------------------------------------

GB = 1024**3
# The base's 16-bit weights may take at most this share of the GPU's free memory before
# `hardware: auto` loads it in 4 bits: the rest is for activations, adapter gradients and optimizer
# states, and the CUDA context.
QLORA_SHARE = 0.5
# CPU features with native bf16 arithmetic (x86 AMX and AVX-512 BF16; ARM's BF16 and SVE BF16).
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
FLASH_ATTN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer


@dataclass(frozen=True)
class HardwareProbe:
    """What `hardware: auto` decides from: the machine's devices and the model's size."""

    cuda: bool = False
    cuda_name: str = ""
    cuda_capability: tuple[int, int] | None = None
    cuda_total_bytes: int = 0
    cuda_free_bytes: int = 0
    cuda_bf16: bool = False  # native bf16 (Ampere and newer), not emulated
    xpu: bool = False
    xpu_name: str = ""
    xpu_total_bytes: int = 0
    xpu_bf16: bool = False
    cpu_bf16: bool = False
    cpu_bf16_features: tuple[str, ...] = ()
    cpu_capability: str = ""
    cpu_cores: int = 1
    ram_total_bytes: int = 0
    bitsandbytes: bool = False
    flash_attn: bool = False
    model_parameters: int | None = None  # None: not needed (no CUDA) or not readable


@dataclass(frozen=True)
class Decision:
    """One `hardware: auto` decision: the config key, the value used and why."""

    key: str
    value: Any
    reason: str
    source: str = "auto"  # "auto": decided here; "config": the config's own value, kept

    def describe(self) -> str:
        kept = " (from config)" if self.source == "config" else ""
        return f"{self.key}={self.value}{kept}: {self.reason}"


def cpu_bf16_features() -> tuple[str, ...]:
    """This CPU's native bf16 instruction sets (empty: bf16 would be emulated)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if capabilities is None:
        return ()
    found = capabilities()
    return tuple(name for name in CPU_BF16_FEATURES if found.get(name) is True)


def ram_total_bytes() -> int:
    """Installed RAM in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return 0


def count_checkpoint_parameters(config: ModelConfig) -> int | None:
    """The model's parameter count without loading its weights: the tensor shapes in a local
    folder's safetensors headers, else its config.json (local or hub) built on the meta device.
    None when neither can be read (e.g. a hub id and no network)."""
    if config.arch:
        return None
    folder = Path(config.name_or_path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        from safetensors import safe_open

        total = 0
        for path in files:
            with safe_open(str(path), framework="pt") as weights:
                for name in weights.keys():
                    shape = weights.get_slice(name).get_shape()
                    total += int(torch.Size(shape).numel())
        return total
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    from lmforge.models.location import model_location

    try:
        model_config = AutoConfig.from_pretrained(
            model_location(config.name_or_path),
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
        )
    except (OSError, ValueError):
        return None
    # With its head where it has one; AutoModel (the backbone) for any other kind.
    for auto_class in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights read
                model = auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code)
        except (ValueError, KeyError, TypeError, ImportError):
            continue
        return sum(param.numel() for param in model.parameters())
    return None


def probe_hardware(config: RunConfig) -> HardwareProbe:
    """Read this machine's devices; the model's size only where a decision needs it (on CUDA)."""
    facts: dict[str, Any] = {}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        facts.update(
            cuda=True,
            cuda_name=props.name,
            cuda_capability=(props.major, props.minor),
            cuda_total_bytes=total,
            cuda_free_bytes=free,
            cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
            model_parameters=count_checkpoint_parameters(config.model),
        )
    if torch.xpu.is_available():
        props = torch.xpu.get_device_properties(0)
        facts.update(
            xpu=True,
            xpu_name=props.name,
            xpu_total_bytes=props.total_memory,
            xpu_bf16=torch.xpu.is_bf16_supported(including_emulation=False),
        )
    features = cpu_bf16_features()
    return HardwareProbe(
        **facts,
        cpu_bf16=bool(features),
        cpu_bf16_features=features,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_cores=os.cpu_count() or 1,
        ram_total_bytes=ram_total_bytes(),
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        flash_attn=flash_attn_available(),
    )


def auto_hardware(config: RunConfig, probe: HardwareProbe) -> tuple[RunConfig, list[Decision]]:
    """`hardware: auto`: the config with device, quantization, dtype, attention and optimizer decided
    for the machine `probe` describes, and each decision with its reason. Keys at their defaults
    (`auto`, quantization `none`, optimizer adamw_torch) are decided; any other value is kept.
    `hardware: manual` returns the config unchanged and no decisions."""
    if config.hardware != "auto":
        return config, []
    decisions: list[Decision] = []
    device = _device(config, probe, decisions)
    quantization = _quantization(config, probe, device, decisions)
    dtype = _dtype(config, probe, device, quantization, decisions)
    attention = _attention(config, probe, device, dtype, decisions)
    optimizer = _optimizer(config, probe, device, quantization, decisions)
    raw = config.model_dump()
    raw["model"].update(device=device, quantization=quantization, dtype=dtype, attn_implementation=attention)
    raw["train"]["optimizer"] = optimizer
    return type(config).model_validate(raw), decisions


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _gpu(probe: HardwareProbe) -> str:
    return probe.cuda_name or "the GPU"


def _device(config: RunConfig, probe: HardwareProbe, decisions: list[Decision]) -> str:
    key = "model.device"
    if config.model.device != "auto":
        decisions.append(Decision(key, config.model.device, "set in the config", "config"))
        return config.model.device
    if probe.cuda:
        reason = f"CUDA GPU {_gpu(probe)} ({_gb(probe.cuda_total_bytes)}, {_gb(probe.cuda_free_bytes)} free)"
        decisions.append(Decision(key, "cuda", reason))
        return "cuda"
    if probe.xpu:
        reason = f"Intel XPU {probe.xpu_name or 'device'} ({_gb(probe.xpu_total_bytes)}), no CUDA GPU"
        decisions.append(Decision(key, "xpu", reason))
        return "xpu"
    decisions.append(Decision(key, "cpu", f"no CUDA or XPU device: CPU ({probe.cpu_cores} cores)"))
    return "cpu"


def _quantization(config: RunConfig, probe: HardwareProbe, device: str, decisions: list[Decision]) -> str:
    from lmforge.adapters.build import QUANTIZED_OK

    key, adapter = "model.quantization", config.adapter
    if config.model.quantization != "none":
        decisions.append(Decision(key, config.model.quantization, "set in the config", "config"))
        return config.model.quantization
    if config.model.arch:
        reason = "model.arch builds a new model that trains every weight: no quantized base"
    elif adapter.method == "none":
        reason = (
            "adapter.method none trains every weight and a quantized base cannot be trained; "
            "use adapter.method: lora to let hardware: auto pick QLoRA"
        )
    elif adapter.method not in QUANTIZED_OK:
        reason = f"adapter.method {adapter.method} has no 4-bit layer in peft: 16-bit base"
    elif adapter.init == "pissa":
        reason = "adapter.init pissa needs the 16-bit base (it would re-quantize the residual)"
    elif device == "cpu":
        reason = "bitsandbytes 4-bit runs slowly on CPU: 16/32-bit base"
    elif device != "cuda":
        reason = (
            f"4-bit is only chosen automatically on CUDA; set model.quantization: 4bit if bitsandbytes "
            f"supports your {device.upper()}"
        )
    elif probe.model_parameters is None:
        reason = (
            "the model's size could not be read (no safetensors files or config.json): 16-bit base; "
            "set model.quantization: 4bit for QLoRA"
        )
    else:
        weights = 2 * probe.model_parameters  # bytes in bf16/fp16
        free = probe.cuda_free_bytes
        size = f"{probe.model_parameters / 1e9:.2f}B parameters = {_gb(weights)} in 16-bit"
        if weights <= QLORA_SHARE * free:
            reason = f"{size}, within half of the {_gb(free)} free on {_gpu(probe)}: 16-bit LoRA"
        elif not probe.bitsandbytes:
            reason = (
                f"{size}, more than half of the {_gb(free)} free on {_gpu(probe)}, but bitsandbytes is "
                "not installed: 16-bit base (pip install bitsandbytes for QLoRA)"
            )
        else:
            reason = (
                f"{size}, more than half of the {_gb(free)} free on {_gpu(probe)}: QLoRA, "
                f"the base in 4-bit NF4 (~{_gb(weights / 4)})"
            )
            if weights / 4 > 0.9 * free:
                reason += "; even 4-bit weights barely fit: expect out-of-memory"
            decisions.append(Decision(key, "4bit", reason))
            return "4bit"
    decisions.append(Decision(key, "none", reason))
    return "none"


def _dtype(
    config: RunConfig, probe: HardwareProbe, device: str, quantization: str, decisions: list[Decision]
) -> str:
    if config.model.dtype != "auto":
        decisions.append(Decision("model.dtype", config.model.dtype, "set in the config", "config"))
        return config.model.dtype
    value, reason = _dtype_choice(config, probe, device, quantization)
    decisions.append(Decision("model.dtype", value, reason))
    return value


def _dtype_choice(config: RunConfig, probe: HardwareProbe, device: str, quantization: str) -> tuple[str, str]:
    full = config.adapter.method == "none"  # every weight trains (also model.arch)
    capability = ".".join(map(str, probe.cuda_capability or ())) or "?"
    if device == "cuda" and probe.cuda_bf16:
        return "bfloat16", f"{_gpu(probe)} computes in bf16 natively"
    if device == "cuda" and full and quantization == "none":
        return "float32", (
            f"{_gpu(probe)} lacks bf16 (compute capability {capability}) and full fine-tuning cannot "
            "train fp16 weights (the fp16 loss scaler refuses fp16 parameters): fp32"
        )
    if device == "cuda":
        return "float16", (
            f"{_gpu(probe)} lacks bf16 (compute capability {capability}): fp16 with loss scaling "
            "(the adapter itself stays fp32)"
        )
    if device == "xpu" and probe.xpu_bf16:
        return "bfloat16", "the XPU computes in bf16"
    if device == "xpu":
        return "float32", "the XPU lacks bf16"
    if not probe.cpu_bf16:
        return "float32", (
            f"this CPU ({probe.cpu_capability or 'unknown'}) has no native bf16 (AVX512-BF16, AMX or "
            "ARM BF16): bf16 would be emulated and slow"
        )
    if full:
        return "float32", "full fine-tuning on CPU keeps fp32 weights (bf16 rounds away small updates)"
    return "bfloat16", (
        f"the CPU has native bf16 ({', '.join(probe.cpu_bf16_features)}) and only the adapter trains "
        "(peft keeps it in fp32): a bf16 base halves memory and runs ~2x faster"
    )


def _attention(
    config: RunConfig, probe: HardwareProbe, device: str, dtype: str, decisions: list[Decision]
) -> str:
    key = "model.attn_implementation"
    if config.model.attn_implementation != "auto":
        decisions.append(Decision(key, config.model.attn_implementation, "set in the config", "config"))
        return config.model.attn_implementation
    value, reason = _attention_choice(probe, device, dtype)
    decisions.append(Decision(key, value, reason))
    return value


def _attention_choice(probe: HardwareProbe, device: str, dtype: str) -> tuple[str, str]:
    capability = probe.cuda_capability or (0, 0)
    if device != "cuda":
        return "sdpa", f"flash-attn is CUDA-only: PyTorch SDPA on {device.upper()}"
    if not probe.flash_attn:
        return "sdpa", "flash-attn is not installed (pip install lmforge[gpu]): PyTorch SDPA"
    if capability < FLASH_ATTN_CAPABILITY:
        return "sdpa", (
            f"flash-attn 2 needs compute capability 8.0+ and {_gpu(probe)} has "
            f"{capability[0]}.{capability[1]}: PyTorch SDPA"
        )
    if dtype == "float32":
        return "sdpa", "flash-attn needs 16-bit activations and the dtype is fp32: PyTorch SDPA"
    return "flash_attention_2", f"flash-attn is installed and {_gpu(probe)} supports it"


def _optimizer(
    config: RunConfig, probe: HardwareProbe, device: str, quantization: str, decisions: list[Decision]
) -> str:
    from lmforge.config.train import TrainConfig

    key, current = "train.optimizer", config.train.optimizer
    if current != TrainConfig.model_fields["optimizer"].default:
        decisions.append(Decision(key, current, "set in the config", "config"))
        return current
    value = current
    if config.adapter.loraplus_lr_ratio is not None:
        reason = "adapter.loraplus_lr_ratio builds its own AdamW"
    elif device == "cuda" and quantization == "4bit" and probe.bitsandbytes:
        value = "paged_adamw_8bit"
        reason = (
            "QLoRA on CUDA: 8-bit AdamW states (a quarter of fp32's), paged to CPU memory on spikes, "
            "as in the QLoRA paper"
        )
    else:
        reason = "AdamW (torch): no 4-bit CUDA base to pair paged 8-bit states with"
    decisions.append(Decision(key, value, reason))
    return value


def hardware_report(probe: HardwareProbe, decisions: list[Decision]) -> dict[str, Any]:
    """hardware.json: the decisions with their reasons, and what was detected."""
    detected = asdict(probe)
    for name in ("cuda_total_bytes", "cuda_free_bytes", "xpu_total_bytes", "ram_total_bytes"):
        detected[name.replace("_bytes", "_gb")] = round(detected.pop(name) / GB, 2)
    return {
        "hardware": "auto",
        "decisions": [asdict(decision) for decision in decisions],
        "detected": detected,
        "torch": torch.__version__,
    }


def apply_hardware(config: RunConfig, quiet: bool = False) -> RunConfig:
    """`hardware: auto`: probe this machine, decide, print each decision with its reason, and keep
    the report on the config (written to hardware.json beside config.yaml). `manual`: unchanged."""
    if config.hardware != "auto":
        return config
    from rich.console import Console
    from rich.markup import escape

    probe = probe_hardware(config)
    resolved, decisions = auto_hardware(config, probe)
    console = Console(stderr=True)
    for decision in decisions if not quiet else []:
        console.print(f"[bold]hardware auto[/]: {escape(decision.describe())}", soft_wrap=True)
    return resolved.with_hardware_report(hardware_report(probe, decisions))
