"""Every shipped YAML validates, and its header shows the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.adapters.build import QUANTIZED_OK
from lmforge.config import load_config
from lmforge.config.loader import load_eval_config
from lmforge.lab.spec import load_arch

ROOT = Path(__file__).resolve().parents[1]
# pipelines (examples/pipelines/) are checked in tests/pipeline/test_example_pipelines.py
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if p.parent.name != "pipelines")


def test_examples_exist():
    names = {p.relative_to(ROOT / "examples").as_posix() for p in EXAMPLES}
    assert {
        "quickstart/sft.yaml",
        "llama2/sft_qlora.yaml",
        "deepseek_r1/sft_lora.yaml",
        "mistral/sft_qlora.yaml",
        "llama2/moe_dora.yaml",
        "llama2/dpo.yaml",
        "llama2/orpo.yaml",
        "deepseek_r1/simpo.yaml",
        "mistral/kto.yaml",
        "qwen2.5/reward.yaml",
        "deepseek_r1/grpo.yaml",
        "llama2/ppo_polish.yaml",
        "qwen2_vl/sft_vision_lora.yaml",
        "qwen2_vl/dpo.yaml",
        "quickstart/eval.yaml",
        "llama2/eval_stages.yaml",
        "deepseek_r1/eval_reasoning.yaml",
        "qwen2_vl/eval.yaml",
        "qwen2.5/eval_chinese.yaml",
        "lab/arch.yaml",
        "lab/pretrain.yaml",
        "lab/sft.yaml",
        "distill/logits.yaml",
        "distill/sequence_level.yaml",
        "t5/sft_lora.yaml",
        "bert/mlm_lora.yaml",
        "bert/classify.yaml",
        "llama2/sft_auto.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(ROOT / "examples").as_posix())
def test_example_validates_and_shows_its_command(path):
    first_line = path.read_text().splitlines()[0]
    if path.name.startswith("arch"):  # a lab architecture, built by `lmforge lab build`
        spec = load_arch(path)
        assert first_line.startswith(f"# lmforge lab build {path.relative_to(ROOT).as_posix()} --out ")
        assert spec.d_model % spec.n_heads == 0
        return
    if path.name.startswith("eval"):
        config = load_eval_config(path)
        assert first_line == f"# lmforge eval {path.relative_to(ROOT).as_posix()}"
        assert config.models and config.tasks
        return
    config = load_config(path)
    assert first_line == f"# lmforge train {path.relative_to(ROOT).as_posix()}"
    assert config.model.trust_remote_code is False
    if config.model.quantization != "none":
        assert config.adapter.method in QUANTIZED_OK
