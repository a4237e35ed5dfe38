"""`hardware: auto`: the decision table on fake machines, each decision with its reason; keys the
user set are kept; and a real run saves the decisions in hardware.json and config.yaml."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import sft_config
from lmforge.artifacts import write_resolved_config
from lmforge.cli import app
from lmforge.config import RunConfig
from lmforge.config.loader import validate_config
from lmforge.models import hardware
from lmforge.models.hardware import (
    GB,
    HardwareProbe,
    apply_hardware,
    auto_hardware,
    count_checkpoint_parameters,
    probe_hardware,
)

LLAMA_7B = 6_738_415_616
T4 = HardwareProbe(
    cuda=True,
    cuda_name="Tesla T4",
    cuda_capability=(7, 5),
    cuda_total_bytes=15 * GB,
    cuda_free_bytes=int(14.6 * GB),
    bitsandbytes=True,
    model_parameters=LLAMA_7B,
)
A100 = HardwareProbe(
    cuda=True,
    cuda_name="NVIDIA A100-SXM4-80GB",
    cuda_capability=(8, 0),
    cuda_total_bytes=80 * GB,
    cuda_free_bytes=79 * GB,
    cuda_bf16=True,
    bitsandbytes=True,
    flash_attn=True,
    model_parameters=LLAMA_7B,
)
CPU_BF16 = HardwareProbe(cpu_bf16=True, cpu_bf16_features=("amx_bf16",), cpu_capability="AVX512", cpu_cores=8)
CPU_OLD = HardwareProbe(cpu_capability="AVX2", cpu_cores=4)
XPU = HardwareProbe(xpu=True, xpu_name="Intel Arc A770", xpu_total_bytes=16 * GB, xpu_bf16=True)
KEYS = ("model.device", "model.quantization", "model.dtype", "model.attn_implementation", "train.optimizer")


def config(**sections) -> RunConfig:
    raw = {
        "model": {"name_or_path": "meta-llama/Llama-2-7b-hf"},
        "data": {"path": "d.json"},
        "hardware": "auto",
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_config(raw)


def decide(probe: HardwareProbe, **sections):
    resolved, decisions = auto_hardware(config(**sections), probe)
    return resolved, {d.key: d for d in decisions}


@pytest.mark.parametrize(
    ("probe", "expected", "reasons"),
    [
        (
            T4,
            ("cuda", "4bit", "float16", "sdpa", "paged_adamw_8bit"),
            [
                "Tesla T4",
                "12.6 GB in 16-bit, more than half of the 14.6 GB free",
                "lacks bf16",
                "not installed",
                "QLoRA",
            ],
        ),
        (
            A100,
            ("cuda", "none", "bfloat16", "flash_attention_2", "adamw_torch"),
            [
                "79.0 GB free",
                "within half of the 79.0 GB free",
                "bf16 natively",
                "flash-attn is installed",
                "AdamW",
            ],
        ),
        (
            CPU_BF16,
            ("cpu", "none", "bfloat16", "sdpa", "adamw_torch"),
            ["no CUDA or XPU", "slowly on CPU", "native bf16 (amx_bf16)", "CUDA-only", "AdamW"],
        ),
        (
            CPU_OLD,
            ("cpu", "none", "float32", "sdpa", "adamw_torch"),
            ["no CUDA or XPU", "slowly on CPU", "no native bf16", "CUDA-only", "AdamW"],
        ),
        (
            XPU,
            ("xpu", "none", "bfloat16", "sdpa", "adamw_torch"),
            [
                "Intel XPU Intel Arc A770",
                "only chosen automatically on CUDA",
                "XPU computes in bf16",
                "XPU",
                "AdamW",
            ],
        ),
    ],
    ids=["t4-7b", "a100-7b", "cpu-bf16", "cpu-no-bf16", "xpu"],
)
def test_decision_table(probe, expected, reasons):
    resolved, decisions = decide(probe)
    assert [decisions[key].value for key in KEYS] == list(expected)
    assert all(decisions[key].source == "auto" for key in KEYS)
    for key, fragment in zip(KEYS, reasons, strict=True):
        assert fragment in decisions[key].reason, (key, decisions[key].reason)
    got = resolved.model
    assert (
        got.device,
        got.quantization,
        got.dtype,
        got.attn_implementation,
        resolved.train.optimizer,
    ) == expected
    assert resolved.adapter.method == "lora" and resolved.hardware == "auto"


def test_full_fine_tuning_is_never_quantized_and_keeps_fp32_on_an_old_gpu():
    _, decisions = decide(T4, adapter={"method": "none"})
    assert decisions["model.quantization"].value == "none"
    assert "adapter.method none" in decisions["model.quantization"].reason
    assert decisions["model.dtype"].value == "float32"  # fp16 weights cannot be trained with the scaler
    assert decisions["train.optimizer"].value == "adamw_torch"
    _, decisions = decide(CPU_BF16, adapter={"method": "none"})
    assert decisions["model.dtype"].value == "float32"


def test_keys_the_user_set_are_kept():
    resolved, decisions = decide(
        T4,
        model={"quantization": "8bit", "dtype": "float32", "attn_implementation": "eager"},
        train={"optimizer": "adamw"},
    )
    for key in KEYS[1:]:
        assert decisions[key].source == "config" and "(from config)" in decisions[key].describe()
    model = resolved.model
    assert (model.quantization, model.dtype, model.attn_implementation) == ("8bit", "float32", "eager")
    assert resolved.train.optimizer == "adamw"
    _, decisions = decide(T4, model={"device": "cpu"})
    assert decisions["model.device"].source == "config"
    assert decisions["model.quantization"].value == "none"  # 4-bit is only picked on CUDA


def test_user_set_4bit_still_gets_the_paged_optimizer_on_cuda():
    _, decisions = decide(A100, model={"quantization": "4bit"})
    assert decisions["model.quantization"].source == "config"
    assert decisions["train.optimizer"].value == "paged_adamw_8bit"


@pytest.mark.parametrize(
    ("probe", "sections", "fragment"),
    [
        (replace(T4, bitsandbytes=False), {}, "bitsandbytes is not installed"),
        (replace(T4, model_parameters=None), {}, "could not be read"),
        (T4, {"adapter": {"method": "fourierft"}}, "no 4-bit layer"),
        (T4, {"adapter": {"method": "lora", "init": "pissa"}}, "pissa"),
    ],
    ids=["no-bitsandbytes", "unknown-size", "adapter-without-4bit", "pissa"],
)
def test_reasons_not_to_quantize_a_large_model(probe, sections, fragment):
    _, decisions = decide(probe, **sections)
    assert decisions["model.quantization"].value == "none"
    assert fragment in decisions["model.quantization"].reason
    assert decisions["train.optimizer"].value == "adamw_torch"


def test_loraplus_keeps_its_adamw_and_old_gpus_get_no_flash_attention():
    _, decisions = decide(T4, adapter={"loraplus_lr_ratio": 16})
    assert decisions["model.quantization"].value == "4bit"
    assert decisions["train.optimizer"].value == "adamw_torch"
    assert "loraplus" in decisions["train.optimizer"].reason
    _, decisions = decide(replace(T4, flash_attn=True))
    assert decisions["model.attn_implementation"].value == "sdpa"
    assert "8.0+" in decisions["model.attn_implementation"].reason


def test_even_4bit_that_barely_fits_is_flagged():
    _, decisions = decide(replace(T4, model_parameters=30_000_000_000))
    assert decisions["model.quantization"].value == "4bit"
    assert "expect out-of-memory" in decisions["model.quantization"].reason


@pytest.mark.parametrize("probe", [T4, A100, CPU_BF16, CPU_OLD, XPU])
def test_deciding_twice_changes_nothing(probe):
    """config.yaml records the decided values: running it again on the same machine decides the same."""
    once, _ = auto_hardware(config(), probe)
    twice, decisions = auto_hardware(once, probe)
    assert twice.model_dump() == once.model_dump()
    assert {d.key: d.value for d in decisions} == {d.key: d.value for d in auto_hardware(config(), probe)[1]}


def test_manual_changes_nothing():
    manual = config().model_copy(update={"hardware": "manual"})
    resolved, decisions = auto_hardware(manual, T4)
    assert resolved is manual and decisions == []
    assert apply_hardware(manual) is manual and manual.hardware_report is None
    assert RunConfig.model_fields["hardware"].default == "manual"


def test_apply_prints_each_decision_and_keeps_the_report(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hardware, "probe_hardware", lambda config: T4)
    resolved = apply_hardware(config(train={"output_dir": str(tmp_path / "run")}))
    assert resolved.model.quantization == "4bit"
    printed = capsys.readouterr().err
    assert "hardware auto: model.quantization=4bit" in printed and "paged_adamw_8bit" in printed
    write_resolved_config(resolved, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "hardware.json").read_text())
    assert report["detected"]["cuda_name"] == "Tesla T4" and report["detected"]["cuda_free_gb"] == 14.6
    assert {d["key"]: d["value"] for d in report["decisions"]}["model.quantization"] == "4bit"
    shown = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert shown["model"]["quantization"] == "4bit" and shown["train"]["optimizer"] == "paged_adamw_8bit"


def test_parameters_are_counted_without_loading_weights(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.config.model import ModelConfig

    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    assert count_checkpoint_parameters(ModelConfig(name_or_path=str(base_dir))) == expected
    only_config = tmp_path / "config-only"  # no weights: the architecture built on the meta device
    only_config.mkdir()
    (only_config / "config.json").write_text((base_dir / "config.json").read_text())
    assert count_checkpoint_parameters(ModelConfig(name_or_path=str(only_config))) == expected
    assert count_checkpoint_parameters(ModelConfig(name_or_path=str(tmp_path / "missing"))) is None


def test_probe_reads_this_machine():
    probe = probe_hardware(config())
    assert probe.cuda == torch.cuda.is_available()
    assert probe.cpu_cores >= 1 and probe.cpu_capability
    if not probe.cuda:
        assert probe.model_parameters is None  # the size is only needed to decide 4-bit on CUDA


def test_a_real_run_saves_its_decisions(tmp_path, base_dir, alpaca_file):
    out = tmp_path / "out"
    raw = {**sft_config(base_dir, alpaca_file, out, max_steps=2), "hardware": "auto"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "hardware auto: model.dtype=" in result.output
    report = json.loads((out / "hardware.json").read_text())
    decided = {d["key"]: d["value"] for d in report["decisions"]}
    assert set(decided) == set(KEYS)
    expected = auto_hardware(validate_config(raw), probe_hardware(validate_config(raw)))[1]
    assert decided == {d.key: d.value for d in expected}
    assert all(d["reason"] for d in report["decisions"])
    assert report["detected"]["cuda"] == torch.cuda.is_available()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["hardware"] == "auto"
    for key, value in decided.items():
        section, name = key.split(".")
        assert resolved[section][name] == value, key
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
