"""Every adapter method: adapter-only training, the base frozen, it learns, save -> load and merge
give the same logits, and it runs on a 4-bit base where peft allows."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import sft_config
from lmforge.adapters.build import MERGEABLE, QUANTIZED_OK
from lmforge.config import validate_config
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import tokenize_examples
from lmforge.models.loading import load_tokenizer
from lmforge.training.stage import load_model_for_training, optimizer_steps
from lmforge.training.trainer import build_trainer

# Learning rates at which each method moves in a dozen steps on the tiny model (vector-only
# methods such as IA3 and VeRA need larger ones, as in their papers).
LR = {"lora": 5e-3, "dora": 5e-3, "adalora": 3e-2, "fourierft": 5e-2, "vera": 1e-1, "ia3": 5e-2, "oft": 5e-3}
METHODS = sorted(LR)


def make_trainer(tmp_path, base_dir, alpaca_file, method, steps=12, **adapter):
    raw = sft_config(base_dir, alpaca_file, tmp_path / method, max_steps=steps, lr=LR[method], batch_size=8)
    raw["adapter"] = {**raw["adapter"], "method": method, **adapter}
    raw["data"]["val_size"] = 0.2
    config = validate_config(raw)
    tokenizer = load_tokenizer(config.model)
    data = load_examples(config.data, "sft")
    template = get_template("chatml")
    train, _ = tokenize_examples(data.train, template, tokenizer, 64)
    held_out, _ = tokenize_examples(data.eval, template, tokenizer, 64)
    model, hardware = load_model_for_training(
        config, quiet=True, total_steps=optimizer_steps(config, len(train))
    )
    return build_trainer(config, model, tokenizer, hardware, train, held_out, "sft", quiet=True), config


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_adapter_only_learns_saves_and_merges(tmp_path, base_dir, alpaca_file, method):
    trainer, _ = make_trainer(tmp_path, base_dir, alpaca_file, method)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert 0 < trainable < 0.5 * sum(p.numel() for p in frozen.values())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    # Learns: held-out loss down and held-out token accuracy up on the addition task.
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_mean_token_accuracy"] > before["eval_mean_token_accuracy"]
    # The base never moved.
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    model.eval()
    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 8]])}
    with torch.no_grad():
        expected = model(**batch).logits
    out = tmp_path / f"{method}-adapter"
    model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(base, out).eval()  # peft alone loads it
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
    assert method in MERGEABLE
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_method_on_a_4bit_base(tmp_path, base_dir, alpaca_file, method):
    pytest.importorskip("bitsandbytes")
    raw = sft_config(base_dir, alpaca_file, tmp_path / method, max_steps=2, lr=LR[method])
    raw["adapter"] = {**raw["adapter"], "method": method}
    raw["model"]["quantization"] = "4bit"
    if method not in QUANTIZED_OK:  # refused by the config, before any model loads
        with pytest.raises(ValueError, match="cannot train on a quantized base"):
            validate_config(raw)
        return
    config = validate_config(raw)
    model, hardware = load_model_for_training(config, quiet=True, total_steps=2)
    tokenizer = load_tokenizer(config.model)
    train, _ = tokenize_examples(
        load_examples(config.data, "sft").train, get_template("chatml"), tokenizer, 64
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = build_trainer(config, model, tokenizer, hardware, train, None, "sft", quiet=True).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_adalora_reallocates_ranks_to_the_target_budget(tmp_path, base_dir, alpaca_file):
    options = {"init_r": 6, "tinit": 2, "tfinal": 3, "delta_t": 1}
    trainer, config = make_trainer(tmp_path, base_dir, alpaca_file, "adalora", steps=14, r=2, adalora=options)
    trainer.train()
    peft_config = trainer.model.peft_config["default"]
    ranks = {name: int(sum(mask)) for name, mask in (peft_config.rank_pattern or {}).items()}
    assert ranks, "update_and_allocate never ran: ranks were not re-allocated"
    assert sum(ranks.values()) == config.adapter.r * len(ranks)  # the final budget: average rank r
    assert len(set(ranks.values())) > 1  # ranks moved away from a uniform init_r
    assert max(ranks.values()) <= options["init_r"]
    # Saving it warns nothing: peft's "a zero-sized lora_A/lora_B is an ungathered ZeRO-3 shard"
    # would be AdaLoRA's pruned ranks here (some modules are pruned to rank 0).
    assert min(ranks.values()) == 0, ranks
    with warnings.catch_warnings(record=True) as caught:  # earlier warnings are shown again in here
        trainer.model.save_pretrained(tmp_path / "saved")
    assert not [w for w in caught if "invalid shape" in str(w.message)], [str(w.message) for w in caught]


def test_loraplus_gives_b_matrices_a_larger_learning_rate(tmp_path, base_dir, alpaca_file):
    trainer, config = make_trainer(tmp_path, base_dir, alpaca_file, "lora", steps=1, loraplus_lr_ratio=16)
    trainer.create_optimizer()
    rates = {group["lr"] for group in trainer.optimizer.param_groups if group["params"]}
    assert rates == {config.train.lr, config.train.lr * 16}


@pytest.mark.parametrize(
    ("layers", "adapted"), [("top:1", {1}), ("last:2", {0, 1}), ("0-0", {0}), ([1], {1})]
)
def test_layer_selection(tmp_path, base_dir, alpaca_file, layers, adapted):
    trainer, _ = make_trainer(tmp_path, base_dir, alpaca_file, "lora", steps=1, layers=layers)
    touched = {
        int(n.split("layers.")[1].split(".")[0]) for n, p in trainer.model.named_parameters() if "lora_" in n
    }
    assert touched == adapted


def test_bad_adapter_choices_are_named(tmp_path, base_dir, alpaca_file):
    with pytest.raises(ValueError, match="the model has 2 layers"):
        make_trainer(tmp_path, base_dir, alpaca_file, "lora", layers="top:5")
    with pytest.raises(ValueError, match="not linear layers of this model; its linear layers are: .*q_proj"):
        make_trainer(tmp_path, base_dir, alpaca_file, "lora", preset="custom", target_modules=["query"])
    with pytest.raises(ValueError, match="is not understood"):
        validate_config({**sft_config(base_dir, alpaca_file, tmp_path), "adapter": {"layers": "bottom:3"}})
    with pytest.raises(ValueError, match="applies to lora/dora"):
        validate_config(
            {
                **sft_config(base_dir, alpaca_file, tmp_path),
                "adapter": {"method": "ia3", "loraplus_lr_ratio": 4},
            }
        )


def test_adapter_table_counts_match_real_adapters(base_dir):
    from lmforge.adapters.build import adapter_table, moe_dora_settings, peft_config
    from lmforge.adapters.moe_dora import MoeDoraModel
    from lmforge.config.adapter import AdapterConfig

    config = AdapterConfig(r=4, layers="top:1")
    rows = {row["method"]: row for row in adapter_table(str(base_dir), config)}
    assert set(rows) == {*METHODS, "vision_lora", "moe_dora"} and "error" in rows["ia3"]
    assert "needs a vision-language model" in rows.pop("vision_lora")["error"]
    moe = MoeDoraModel(
        AutoModelForCausalLM.from_pretrained(base_dir),
        moe_dora_settings(
            config.model_copy(update={"method": "moe_dora"}), AutoModelForCausalLM.from_pretrained(base_dir)
        ),
    )
    assert (
        rows.pop("moe_dora")["trainable"] == sum(p.numel() for p in moe.parameters() if p.requires_grad) > 0
    )
    for method in METHODS:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        if "error" in rows[method]:  # ia3 cannot be limited to layers: the config and the table say why
            assert "cannot be limited to some layers" in rows[method]["error"]
            with pytest.raises(ValueError, match="cannot be limited to some layers"):
                AdapterConfig.model_validate({**config.model_dump(), "method": method})
            continue
        method_config = config.model_copy(update={"method": method})
        wrapped = get_peft_model(model, peft_config(method_config, model, total_steps=100))
        real = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert rows[method]["trainable"] == real, method


def test_adapters_command_prints_the_table(base_dir):
    from typer.testing import CliRunner

    from lmforge.cli import app

    result = CliRunner().invoke(app, ["adapters", "--model", str(base_dir), "adapter.r=4"])
    assert result.exit_code == 0, result.output
    for method in (*METHODS, "moe_dora"):
        assert method in result.output
    bad = CliRunner().invoke(app, ["adapters", "--model", str(base_dir), "train.lr=1"])
    assert bad.exit_code == 1 and "only adapter.* settings apply here" in bad.output


def test_pissa_starts_at_the_base_function_and_saves_a_lora_of_the_original_base(
    tmp_path, base_dir, alpaca_file
):
    from lmforge.artifacts import save_artifact

    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 8]])}
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**batch).logits
    trainer, config = make_trainer(
        tmp_path, base_dir, alpaca_file, "lora", steps=6, init="pissa", dropout=0.0
    )
    model = trainer.model.eval()
    with torch.no_grad():  # PiSSA splits each weight into residual + adapter: same function at start
        torch.testing.assert_close(model(**batch).logits, original, atol=1e-4, rtol=0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # unlike default LoRA, B starts non-zero
    trainer.train()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    assert not torch.allclose(trained, original, atol=1e-3)
    out = save_artifact(
        model, trainer.processing_class, get_template("chatml"), tmp_path / "a", "adapter", config
    )
    # The saved adapter is a plain LoRA (rank 2r) for the *original* base, loadable by peft alone.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    assert reloaded.peft_config["default"].r == 2 * config.adapter.r
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded.merge_and_unload()(**batch).logits, trained, atol=1e-4, rtol=0)
