"""Config: strict schema, overrides, did-you-mean, every key documented."""

from __future__ import annotations

import pytest
import yaml

from lmforge.config import ConfigError, RunConfig, iter_keys, load_config, parse_overrides, validate_config

MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.json"}}


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"lrr": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert path in message
    assert "unknown key `train.lrr`" in message
    assert "did you mean `train.lr`?" in message


def test_unknown_section_suggests_section(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `adapter`"):
        load_config(write(tmp_path, {**MINIMAL, "adaptor": {"r": 4}}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {**MINIMAL, "train": {"batch_size": "four"}}))
    assert "`train.batch_size`" in str(err.value)
    assert "'four'" in str(err.value)


def test_every_problem_is_reported_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {**MINIMAL, "train": {"lrr": 1, "batch_size": "x"}}))
    assert len(str(err.value).splitlines()) == 2


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "adapter.r=16", "train.padding_free=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.r == 16
    assert cfg.train.padding_free is False
    assert parse_overrides(["data.system=be brief"]) == {"data": {"system": "be brief"}}


def test_bad_override_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_override_typo_is_caught(tmp_path):
    with pytest.raises(ConfigError, match="did you mean `train.batch_size`"):
        load_config(write(tmp_path, MINIMAL), ["train.batch_sz=2"])


def test_missing_model_and_custom_preset_without_targets():
    with pytest.raises(ConfigError, match="model.name_or_path is empty"):
        validate_config({"data": {"path": "d.json"}})
    with pytest.raises(ConfigError, match="target_modules is empty"):
        validate_config({**MINIMAL, "adapter": {"preset": "custom"}})


def test_quantized_base_needs_adapter():
    with pytest.raises(ConfigError, match="cannot be trained directly"):
        validate_config(
            {**MINIMAL, "model": {"name_or_path": "m", "quantization": "4bit"}, "adapter": {"method": "none"}}
        )


def test_every_key_has_help_and_default():
    keys = list(iter_keys())
    assert len(keys) > 40
    for key, _kind, _default, help_text in keys:
        assert help_text, f"{key} has no description"
    names = {k for k, *_ in keys}
    assert {"train.lr", "adapter.r", "model.quantization", "data.template", "train.resume"} <= names
    # keys inside a list of sections and an optional section are listed too, with readable types
    assert {
        "data.datasets[].weight",
        "data.datasets[].columns.chosen",
        "data.datasets[].tags.role_tag",
        "train.optimizer_args[optimizer=lion].betas",
        "train.optimizer_args[optimizer=muon].adamw_lr",
        "train.optimizer_args[optimizer=adamw*].eps",
    } <= names
    kinds = {k: kind for k, kind, *_ in keys}
    assert kinds["data.system"] == "str | None"


def test_defaults_are_sane():
    cfg = RunConfig.model_validate(MINIMAL)
    assert cfg.method.name == "sft"
    assert cfg.adapter.method == "lora"
    assert cfg.model.trust_remote_code is False


def test_switching_optimizer_drops_the_other_optimizers_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name_or_path: m}\ndata: {path: d.json}\n"
        "train: {optimizer: sophia, optimizer_args: {rho: 1.0, hessian_every: 2}}\n"
    )
    assert load_config(path, ["train.optimizer=lion"]).train.optimizer_options.betas == (0.9, 0.99)
    kept = load_config(path, ["train.lr=1e-3"]).train
    assert kept.optimizer == "sophia" and kept.optimizer_options.rho == 1.0


def test_muon_original_scaling_needs_an_adamw_lr():
    with pytest.raises(
        ConfigError, match=r"adjust_lr_fn original .* far too high for the AdamW part: set adamw_lr"
    ):
        validate_config(
            {**MINIMAL, "train": {"optimizer": "muon", "optimizer_args": {"adjust_lr_fn": "original"}}}
        )
    config = {
        **MINIMAL,
        "train": {"optimizer": "muon", "optimizer_args": {"adjust_lr_fn": "original", "adamw_lr": 3e-4}},
    }
    assert validate_config(config).train.optimizer_options.adamw_lr == 3e-4
