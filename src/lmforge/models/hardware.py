"""One decision, made in one place: which device, dtype and attention kernel to use."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

from lmforge.config.model import ModelConfig

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
    """CUDA -> bf16 if supported else fp16, flash-attn 2 if installed else SDPA; CPU -> fp32."""
    reasons: list[str] = []
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise RuntimeError("model.device is cuda but no CUDA device is visible; use model.device: auto")
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
    else:
        dtype = torch.float32
        reasons.append("fp32 on CPU")

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
        reasons.append("SDPA (flash-attn not installed)" if device == "cuda" else "SDPA on CPU")
    return Hardware(device=device, dtype=dtype, attn_implementation=attn, reasons=reasons)
