"""MoE-DoRA: the formulation on hand-checkable numbers, then training, saving, resuming, serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import sft_config
from lmforge.adapters.moe_dora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    MoeDoraLinear,
    MoeDoraModel,
    MoeDoraSettings,
    _Batch,
    load_balancing_loss,
)
from lmforge.artifacts import save_artifact
from lmforge.config import validate_config
from lmforge.data.loader import load_examples
from lmforge.data.templates import Conversation, get_template
from lmforge.data.tokenize import tokenize_examples
from lmforge.export.merge import MergeError, merge_adapter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.methods import sft
from lmforge.models.loading import load_tokenizer
from lmforge.training.checkpoints import COMPLETE_MARKER
from lmforge.training.stage import load_model_for_training
from lmforge.training.trainer import build_trainer

BATCH = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 8]])}


def moe_config(base_dir, data, out, adapter=None, **train) -> dict:
    raw = sft_config(base_dir, data, out, **{"lr": 5e-3, "batch_size": 8, **train})
    raw["adapter"] = {"method": "moe_dora", "r": 4, "alpha": 8, "dropout": 0.0, **(adapter or {})}
    return raw


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_load_balancing_loss_on_hand_computed_numbers():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    chosen = torch.tensor([[0], [0]])
    # Both tokens go to expert 0: f = (1, 0), P = (0.7, 0.3) -> 2 * (1 * 0.7) = 1.4
    assert load_balancing_loss(probs, chosen).item() == pytest.approx(1.4)
    # The second token is padding: f = (1, 0), P = (0.8, 0.2) -> 1.6
    assert load_balancing_loss(probs, chosen, torch.tensor([1, 0])).item() == pytest.approx(1.6)
    # Top-2 of 3 experts, uniform router, each pair used once: the minimum, 1.
    uniform = torch.full((3, 3), 1 / 3)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert load_balancing_loss(uniform, pairs).item() == pytest.approx(1.0)


def test_layer_computes_the_routed_mixture_of_dora_experts():
    torch.manual_seed(1)
    base = nn.Linear(6, 5, bias=True)
    settings = MoeDoraSettings(targets=[], experts=3, top_k=2, r=2, alpha=4.0)
    layer = MoeDoraLinear(base, settings, _Batch())
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)  # B = 0: exactly the base
    with torch.no_grad():
        layer.experts_B.normal_()
        layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    # The formula written out: W_e = m_e * V_e / ||V_e||_row with V_e = W0 + s B_e A_e;
    # y = sum over the top-2 experts of the renormalised gate times W_e x, plus b.
    s = settings.alpha / settings.r
    probs = (x @ layer.router.T).softmax(-1)
    expected = torch.zeros(4, 5)
    for t in range(4):
        top = probs[t].topk(2)
        for p, e in zip(top.values, top.indices, strict=True):
            v = base.weight + s * layer.experts_B[e] @ layer.experts_A[e]
            w = layer.magnitude[e][:, None] * v / v.norm(dim=1, keepdim=True)
            expected[t] += p / top.values.sum() * (w @ x[t])
    expected += base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_only_the_adapter_trains_on_the_top_layers_by_default(base_dir):
    from lmforge.adapters.build import attach_adapter
    from lmforge.config.adapter import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        expected = model(**BATCH).logits
    config = AdapterConfig(method="moe_dora", r=4, moe_dora={"top_layers": 1, "experts": 3, "top_k": 2})
    wrapped = attach_adapter(model, config, gradient_checkpointing=False)
    layers = {name.split("layers.")[1].split(".")[0] for name, _ in wrapped.moe_layers()}
    assert layers == {"1"}, "adapter.layers: auto puts MoE-DoRA on the top moe_dora.top_layers"
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.rsplit(".", 1)[-1] in ("experts_A", "experts_B", "router", "magnitude") for n in trainable
    )
    with torch.no_grad():  # starts at the base function
        torch.testing.assert_close(wrapped(**BATCH).logits, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged: each token is routed"):
        wrapped.merge_and_unload()


def test_moe_dora_learns_saves_loads_serves_and_refuses_merge(tmp_path, base_dir, alpaca_file):
    raw = moe_config(base_dir, alpaca_file, tmp_path / "run", max_steps=16)
    raw["data"]["val_size"] = 0.2
    config = validate_config(raw)
    tokenizer = load_tokenizer(config.model)
    data = load_examples(config.data, "sft")
    template = get_template("chatml")
    train, _ = tokenize_examples(data.train, template, tokenizer, 64)
    held_out, _ = tokenize_examples(data.eval, template, tokenizer, 64)
    model, hardware = load_model_for_training(config, quiet=True, total_steps=16)
    trainer = build_trainer(config, model, tokenizer, hardware, train, held_out, "sft", quiet=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # Learns the addition task: held-out loss down, held-out token accuracy up.
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_mean_token_accuracy"] > before["eval_mean_token_accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("moe_aux_loss" in row for row in rows), "the load-balancing loss is logged"
    adapter = save_artifact(model, tokenizer, template, tmp_path / "run" / "adapter", "adapter", config)
    names = {p.name for p in adapter.iterdir()}
    assert {CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "lmforge_template.txt"} <= names
    assert "library_name: lmforge" in (adapter / "README.md").read_text()
    tensors = load_file(adapter / WEIGHTS_FILE)
    assert tensors and not any(k.endswith("base_layer.weight") for k in tensors), "base not saved"
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("experts_B"))

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = base(**BATCH).logits
    loaded = MoeDoraModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        adapted = loaded(**BATCH).logits
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(**BATCH).logits, base_logits)
    assert (adapted - base_logits).abs().max() > 1e-3
    # A second load gives identical logits (save -> load is exact).
    again = MoeDoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**BATCH).logits, adapted, atol=0, rtol=0)
    assert not any(p.requires_grad for p in again.parameters())

    # Served through the engine over the base: greedy output equals the wrapped model's.
    engine = Engine.load(str(base_dir), adapter=str(adapter))
    assert isinstance(engine.model, MoeDoraModel)
    conversation = Conversation(turns=[("add 3 and 4", "")])
    reply = engine.generate([conversation], SamplingParams(max_new_tokens=4))[0]
    prompt = engine.tokenizer(engine.prompt_text(conversation), return_tensors="pt")
    with torch.no_grad():
        direct = loaded.generate(**prompt, max_new_tokens=4, do_sample=False, eos_token_id=engine.stop_ids)
    new = direct[0, prompt["input_ids"].shape[1] :]
    assert reply == engine.tokenizer.decode(new, skip_special_tokens=True)

    with pytest.raises(MergeError, match="MoE-DoRA adapter, which cannot be merged"):
        merge_adapter(str(base_dir), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_resume_matches_uninterrupted_and_checkpoints_hold_only_the_adapter(tmp_path, base_dir, alpaca_file):
    full = tmp_path / "full"
    sft.run(validate_config(moe_config(base_dir, alpaca_file, full, max_steps=6, save_steps=3)), quiet=True)
    checkpoint = load_file(full / "checkpoint-3" / "model.safetensors")
    assert checkpoint and all(
        k.rsplit(".", 1)[-1] in ("experts_A", "experts_B", "router", "magnitude") for k in checkpoint
    )
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    assert (killed / "checkpoint-3" / COMPLETE_MARKER).is_file()
    config = moe_config(base_dir, alpaca_file, killed, max_steps=6, save_steps=3, resume="auto")
    sft.run(validate_config(config), quiet=True)
    resumed, uninterrupted = losses(killed), losses(full)
    assert min(resumed) == 4
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6)
    a = load_file(full / "adapter" / WEIGHTS_FILE)
    b = load_file(killed / "adapter" / WEIGHTS_FILE)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_moe_dora_on_a_4bit_base_with_gradient_checkpointing(tmp_path, base_dir, alpaca_file):
    pytest.importorskip("bitsandbytes")
    raw = moe_config(base_dir, alpaca_file, tmp_path / "q", max_steps=3, gradient_checkpointing=True)
    raw["model"]["quantization"] = "4bit"
    config = validate_config(raw)
    model, hardware = load_model_for_training(config, quiet=True, total_steps=3)
    assert isinstance(model, MoeDoraModel) and model.is_quantized
    tokenizer = load_tokenizer(config.model)
    train, _ = tokenize_examples(
        load_examples(config.data, "sft").train, get_template("chatml"), tokenizer, 64
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = build_trainer(config, model, tokenizer, hardware, train, None, "sft", quiet=True).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # Every kind of adapter tensor moved, the router included, through the checkpointed layers.
    for kind in ("experts_A", "experts_B", "router", "magnitude"):
        names = [n for n in start if n.endswith(kind)]
        assert names and any(not torch.equal(model.get_parameter(n), start[n]) for n in names), kind


def test_bad_moe_dora_settings_are_named(tmp_path, base_dir, alpaca_file):
    with pytest.raises(ValueError, match="top_k \\(3\\) is more than moe_dora.experts \\(2\\)"):
        validate_config(
            moe_config(base_dir, alpaca_file, tmp_path, adapter={"moe_dora": {"experts": 2, "top_k": 3}})
        )
    with pytest.raises(ValueError, match="applies to lora/dora"):
        validate_config(moe_config(base_dir, alpaca_file, tmp_path, adapter={"loraplus_lr_ratio": 4}))
