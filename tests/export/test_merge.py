"""Merging: merged logits equal adapter logits; quantized bases are refused with the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.export.merge import MergeError, merge_adapter
from lmforge.methods import sft


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, base_dir, alpaca_file):
    out = tmp_path_factory.mktemp("merge-run")
    # A large learning rate so the adapter changes the logits visibly.
    config = validate_config(sft_config(base_dir, alpaca_file, out, max_steps=6, lr=5e-3))
    return sft.run(config, quiet=True).artifact


def test_merged_logits_equal_adapter_logits(tmp_path, base_dir, adapter_dir, tokenizer):
    merged_dir = merge_adapter(str(base_dir), adapter_dir, tmp_path / "merged")
    ids = tokenizer(["<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(**ids).logits
        adapter_logits = PeftModel.from_pretrained(base, adapter_dir)(**ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(**ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, (
        "the adapter must matter for this test to mean much"
    )
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    names = {p.name for p in merged_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "lmforge_template.txt"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert (merged_dir / "lmforge_template.txt").read_text().strip() == "chatml"
    assert not list(tmp_path.glob(".merged.tmp-*")), "no temporary folder is left behind"


def test_sharded_merge_reloads_like_the_single_file_merge(tmp_path, base_dir, adapter_dir, tokenizer):
    whole = merge_adapter(str(base_dir), adapter_dir, tmp_path / "whole")
    sharded = merge_adapter(str(base_dir), adapter_dir, tmp_path / "sharded", max_shard_size="100KB")
    assert (whole / "model.safetensors").is_file(), "the 5GB default keeps a tiny model in one file"
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert all((sharded / name).stat().st_size < 100_000 for name in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    names = {p.name for p in sharded.iterdir()}
    assert "model.safetensors" not in names
    assert {"tokenizer.json", "chat_template.jinja", "lmforge_template.txt", "README.md"} <= names
    assert (sharded / "lmforge_template.txt").read_text().strip() == "chatml"
    assert "# lmforge merged model" in (sharded / "README.md").read_text()
    ids = tokenizer(["<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        whole_logits = AutoModelForCausalLM.from_pretrained(whole)(**ids).logits
        sharded_logits = AutoModelForCausalLM.from_pretrained(sharded)(**ids).logits
    torch.testing.assert_close(sharded_logits, whole_logits, atol=0, rtol=0)


@pytest.mark.parametrize("size", ["5 gigs", "0GB", "100"])
def test_unreadable_shard_size_is_refused_before_loading(tmp_path, base_dir, size):
    with pytest.raises(MergeError, match="is not a size.*e.g. 5GB"):
        merge_adapter(str(base_dir), base_dir, tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_quantized_base_is_refused_with_fix(tmp_path, base_dir, adapter_dir):
    quantized = tmp_path / "quantized"
    shutil.copytree(base_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="stored quantized .*original 16-bit base"):
        merge_adapter(str(quantized), adapter_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_an_adapter(tmp_path, base_dir):
    with pytest.raises(MergeError, match="not an adapter folder"):
        merge_adapter(str(base_dir), base_dir, tmp_path / "out")


@pytest.mark.parametrize("method", ["adalora", "ia3", "oft", "vera", "fourierft"])
def test_other_peft_methods_merge_through_lmforge_merge(tmp_path, base_dir, tokenizer, method):
    from peft import get_peft_model

    from lmforge.adapters.build import peft_config
    from lmforge.config.adapter import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = AdapterConfig(method=method, r=4, fourierft={"n_frequency": 64})
    wrapped = get_peft_model(model, peft_config(config, model, total_steps=100))
    with torch.no_grad():  # a trained-looking adapter: every adapter tensor moved off its init
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = tokenizer(["add 3 and 4 is"], return_tensors="pt")
    with torch.no_grad():
        expected = wrapped.eval()(**ids).logits
    merged_dir = merge_adapter(str(base_dir), tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(**ids).logits
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
