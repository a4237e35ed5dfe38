"""train.kernels and train.compile (docs/hardware.md): Liger where it can run (CUDA, installed,
a model family it covers), refused with the reason where asked for and it cannot; torch.compile
through the Trainer, training to the losses of the eager run."""

from __future__ import annotations

import json

import pytest

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.config.train import TrainConfig
from lmforge.training import kernels


def test_liger_is_used_only_where_it_can_run(monkeypatch):
    auto, liger, none = (TrainConfig(kernels=k) for k in ("auto", "liger", "none"))
    assert kernels.use_liger(auto, "cpu", "llama") is False
    with pytest.raises(
        ValueError, match="liger but Liger's kernels are Triton GPU kernels and this run is on cpu"
    ):
        kernels.use_liger(liger, "cpu", "llama")
    monkeypatch.setattr(kernels, "liger_families", lambda: set())
    with pytest.raises(ValueError, match="liger-kernel is not installed .pip install liger-kernel"):
        kernels.use_liger(liger, "cuda", "llama")
    assert kernels.use_liger(auto, "cuda", "llama") is False
    monkeypatch.setattr(kernels, "liger_families", lambda: {"llama", "qwen2"})
    assert kernels.use_liger(auto, "cuda", "llama") is True
    assert kernels.use_liger(liger, "cuda", "qwen2") is True
    assert kernels.use_liger(none, "cuda", "llama") is False
    assert kernels.use_liger(auto, "cuda", "gpt2") is False
    with pytest.raises(ValueError, match="no kernels for model type 'gpt2' .it covers llama, qwen2"):
        kernels.use_liger(liger, "cuda", "gpt2")


def test_the_model_type_is_read_under_a_peft_wrapper(base_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert kernels.model_type(model) == "llama"
    assert kernels.model_type(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))) == "llama"


def test_ppo_refuses_what_its_own_loop_does_not_use(base_dir, tmp_path):
    from lmforge.methods import ppo

    for train in ({"compile": True}, {"kernels": "liger"}):
        config = validate_config(
            {
                "model": {"name_or_path": str(base_dir)},
                "method": {"name": "ppo", "rewards": [{"builtin": "exact_answer"}]},
                "data": {"path": str(tmp_path / "p.json")},
                "train": {"output_dir": str(tmp_path / "o"), **train},
            }
        )
        with pytest.raises(
            ValueError, match="ppo's own loop does not use train.kernels: liger or train.compile"
        ):
            ppo.check(config)


def test_compiled_training_follows_the_eager_losses(tmp_path, base_dir, alpaca_file, monkeypatch):
    """torch.compile (inductor on CPU) trains the same model to the same per-step losses."""
    import torch

    from lmforge.methods import run

    compiled_with, compile_model = [], torch.compile

    def counting(model, **options):
        compiled_with.append(options.get("backend"))
        return compile_model(model, **options)

    monkeypatch.setattr(torch, "compile", counting)
    losses = {}
    for compiled in (False, True):
        raw = sft_config(base_dir, alpaca_file, tmp_path / f"c{compiled}", max_steps=3, compile=compiled)
        raw["data"]["packing"] = True  # fixed-width rows: one compiled graph
        run(validate_config(raw), quiet=True)
        rows = [
            json.loads(line)
            for line in (tmp_path / f"c{compiled}" / "metrics.jsonl").read_text().splitlines()
        ]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert compiled_with == ["inductor"]  # the compiled run only
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
