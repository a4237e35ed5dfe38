"""The hardware choice: one function, explained, refusing impossible asks."""

from __future__ import annotations

import pytest
import torch

from lmforge.config.model import ModelConfig
from lmforge.models.hardware import choose_hardware


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_cpu_defaults_and_reasons():
    hardware = choose_hardware(ModelConfig(name_or_path="m"))
    assert (hardware.device, hardware.dtype, hardware.attn_implementation) == ("cpu", torch.float32, "sdpa")
    assert "device=cpu dtype=float32 attention=sdpa" in hardware.describe()
    assert "no CUDA device" in hardware.describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_impossible_asks_are_refused():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_hardware(ModelConfig(name_or_path="m", device="cuda"))
    with pytest.raises(RuntimeError, match="flash-attn"):
        choose_hardware(ModelConfig(name_or_path="m", attn_implementation="flash_attention_2"))


def test_explicit_dtype_wins():
    hardware = choose_hardware(ModelConfig(name_or_path="m", dtype="bfloat16", device="cpu"))
    assert hardware.dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_prefers_bf16_and_fast_attention():
    hardware = choose_hardware(ModelConfig(name_or_path="m"))
    assert hardware.device == "cuda"
    assert hardware.dtype in (torch.bfloat16, torch.float16)
    assert hardware.attn_implementation in ("flash_attention_2", "sdpa")
