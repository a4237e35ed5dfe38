"""The one dispatcher (`lmforge.methods.run`): which driver runs each method on each kind of model,
and that the CLI and the pipeline go through it."""

from __future__ import annotations

import pytest

from lmforge import methods
from lmforge.config import validate_config
from lmforge.models.tiny import build_tiny_t5, save_tiny

METHODS = [
    "sft",
    "dpo",
    "orpo",
    "simpo",
    "kto",
    "reward",
    "ppo",
    "grpo",
    "distill",
    "pretrain",
    "mlm",
    "classify",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer):
    return save_tiny(build_tiny_t5(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-t5"))


def config(model, method: str, tmp_path):
    raw = {"model": {"name_or_path": str(model)}, "method": {"name": method}, "data": {"path": "x.json"}}
    raw["train"] = {"output_dir": str(tmp_path)}
    if method == "distill":
        raw["method"]["distill"] = {"teacher": str(model)}
    if method in ("ppo", "grpo"):
        raw["method"]["rewards"] = [{"builtin": "exact_answer"}]
    return validate_config(raw)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_has_its_driver(base_dir, tmp_path, method):
    expected = {"orpo": "dpo", "simpo": "dpo"}.get(method, method)
    assert methods.driver_name(config(base_dir, method, tmp_path)) == expected


def test_vision_language_and_seq2seq_models_get_their_variants(vlm_dir, t5_dir, tmp_path):
    """The variants a driver used to hand off to itself, now chosen in one place."""
    for method in ("dpo", "orpo", "simpo"):
        assert methods.driver_name(config(vlm_dir, method, tmp_path)) == "dpo_vision"
    assert methods.driver_name(config(vlm_dir, "sft", tmp_path)) == "sft_vision"
    assert methods.driver_name(config(t5_dir, "sft", tmp_path)) == "sft_seq2seq"
    assert methods.driver_name(config(vlm_dir, "kto", tmp_path)) == "kto"  # refused by its own check


def test_the_variant_checks_include_the_method_checks(vlm_dir, tmp_path):
    """sft's own refusals still reach a vision-language model (its variant runs sft.check first)."""
    raw = config(vlm_dir, "sft", tmp_path).model_dump()
    raw["data"]["format"] = "text"
    with pytest.raises(ValueError, match="SFT needs instruction or chat records"):
        methods.run(validate_config(raw), quiet=True)


def test_cli_and_pipeline_dispatch_through_methods_run(monkeypatch, tmp_path, base_dir):
    import lmforge.cli

    calls = []
    monkeypatch.setattr(methods, "run", lambda config, quiet=False: calls.append(config.method.name))
    with pytest.raises(AttributeError):
        lmforge.cli.run_stage  # noqa: B018  (the dispatcher left the CLI)
    from typer.testing import CliRunner

    path = tmp_path / "c.yaml"
    path.write_text(
        f"model: {{name_or_path: {base_dir}}}\ndata: {{path: x.json}}\ntrain: {{output_dir: {tmp_path}}}\n"
    )
    CliRunner().invoke(lmforge.cli.app, ["train", str(path)])
    assert calls == ["sft"]
