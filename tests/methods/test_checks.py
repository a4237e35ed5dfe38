"""Config combinations are refused before any model loads (a 7B user gets the error at once):
each check here either fails validation or stops in the stage's head, with `_load` (every model
load goes through it) made to fail the test if it is reached."""

from __future__ import annotations

import pytest

from helpers import sft_config
from lmforge import methods
from lmforge.config import validate_config
from lmforge.models import loading


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(loading, "_load", refuse)


def raw(base_dir, data, out, stage="sft", **adapter) -> dict:
    config = sft_config(base_dir, data, out, max_steps=4)
    config["method"] = {"name": stage}
    config["adapter"] = {**config["adapter"], **adapter}
    return config


@pytest.mark.parametrize(
    ("adapter", "model", "message"),
    [
        ({"init": "pissa"}, {"quantization": "4bit"}, "adapter.init pissa on a quantized base"),
        (
            {"method": "vera"},
            {"quantization": "4bit"},
            "adapter.method vera cannot train on a quantized base",
        ),
        ({"method": "fourierft"}, {"quantization": "8bit"}, "fourierft cannot train on a quantized base"),
        ({"method": "ia3", "layers": "top:1"}, {}, "ia3 cannot be limited to some layers"),
        ({"method": "adalora", "adalora": {"tinit": 2, "tfinal": 2}}, {}, r"leave no steps .*max_steps=4"),
    ],
)
def test_adapter_combinations_are_refused_by_the_schema(
    tmp_path, base_dir, alpaca_file, adapter, model, message
):
    config = raw(base_dir, alpaca_file, tmp_path / "out", **adapter)
    config["model"].update(model)
    with pytest.raises(ValueError, match=message):
        validate_config(config)


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto", "grpo", "ppo"])
def test_continuing_an_adalora_adapter_with_a_reference_is_refused(tmp_path, base_dir, alpaca_file, method):
    config = raw(base_dir, alpaca_file, tmp_path / "out", method, method="adalora", path=str(tmp_path))
    if method in ("grpo", "ppo"):
        config["method"]["rewards"] = [{"builtin": "exact_answer"}]
    with pytest.raises(ValueError, match=f"{method} cannot continue an AdaLoRA adapter"):
        validate_config(config)


def test_sft_may_continue_an_adalora_adapter(tmp_path, base_dir, alpaca_file):
    config = raw(base_dir, alpaca_file, tmp_path / "out", method="adalora", path=str(tmp_path))
    assert validate_config(config).adapter.path == str(tmp_path)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_a_cuda_only_optimizer_without_a_gpu_stops_before_loading(tmp_path, base_dir, alpaca_file, optimizer):
    config = raw(base_dir, alpaca_file, tmp_path / "out")
    config["train"]["optimizer"] = optimizer
    config["model"]["device"] = "cpu"
    with pytest.raises(ValueError, match=f"train.optimizer {optimizer} keeps bitsandbytes"):
        methods.run(validate_config(config), quiet=True)
    assert not (tmp_path / "out" / "config.yaml").exists()  # refused before anything was written


def test_the_guard_catches_a_model_load(tmp_path, base_dir, alpaca_file):
    # The fixture above is what makes the other tests mean "before loading": a valid config loads.
    with pytest.raises(AssertionError, match="a model was loaded"):
        methods.run(validate_config(raw(base_dir, alpaca_file, tmp_path / "out")), quiet=True)


def test_full_fine_tuning_a_stored_quantized_base_stops_before_loading(tmp_path, base_dir, alpaca_file):
    import json
    import shutil

    quantized = tmp_path / "quantized"
    shutil.copytree(base_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    run = raw(quantized, alpaca_file, tmp_path / "out", method="none")
    with pytest.raises(ValueError, match=r"stored quantized \(bitsandbytes.*adapter.method: lora"):
        methods.run(validate_config(run))
    with_adapter = raw(quantized, alpaca_file, tmp_path / "out")
    with pytest.raises(AssertionError, match="a model was loaded"):  # an adapter on it passes the check
        methods.run(validate_config(with_adapter))
