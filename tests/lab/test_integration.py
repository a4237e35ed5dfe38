"""A lab model goes the path of any hub model: LoRA SFT, trl's DPO, merge, generation through
the engine, a reward head, and the `lmforge lab` commands."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import corpus
from helpers import addition_records, sft_config
from lmforge.cli import app
from lmforge.config import validate_config
from lmforge.config.model import ModelConfig
from lmforge.data.templates import Conversation, get_template
from lmforge.export.merge import merge_adapter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.lab.build import build, build_model
from lmforge.lab.spec import ArchSpec
from lmforge.methods import dpo, pretrain, sft
from lmforge.models.loading import load_causal_lm


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory, tokenizer):
    """A lab model with ALiBi and grouped-query attention, built and saved like `lmforge lab build`."""
    spec = ArchSpec(
        tokenizer="unused",
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        position="alibi",
        norm="layernorm",
        activation="gelu",
    )
    return build(spec, tmp_path_factory.mktemp("lab") / "model", tokenizer, get_template("chatml"))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, lab_dir):
    """The built model, pre-trained further from its folder (model.name_or_path, not model.arch)."""
    root = tmp_path_factory.mktemp("lab-pretrain")
    (root / "corpus.txt").write_text("\n".join(corpus()) + "\n")
    config = sft_config(lab_dir, root / "corpus.txt", root / "run", max_steps=60, lr=5e-3, batch_size=16)
    config["method"] = {"name": "pretrain"}
    config["adapter"] = {"method": "none"}
    return pretrain.run(validate_config(config), quiet=True).artifact


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, pretrained_dir):
    root = tmp_path_factory.mktemp("lab-sft")
    data = root / "add.json"
    data.write_text(json.dumps(addition_records([(a, b) for a in range(10) for b in range(10)])))
    config = sft_config(pretrained_dir, data, root / "run", max_steps=40, lr=1e-2, batch_size=16)
    return sft.run(validate_config(config), quiet=True)


def test_lora_sft_learns_and_merges_to_the_same_logits(sft_run, pretrained_dir, tmp_path):
    rows = [json.loads(line) for line in (sft_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[0] / 2

    merged = merge_adapter(str(pretrained_dir), sft_run.artifact, tmp_path / "merged")
    with_adapter = Engine.load(str(pretrained_dir), adapter=str(sft_run.artifact))
    merged_engine = Engine.load(str(merged))
    ids = torch.tensor([[5, 17, 42, 9, 3, 77]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged_engine.model(ids).logits, with_adapter.model(ids).logits, atol=1e-4, rtol=1e-4
        )
    prompts = [Conversation(turns=[(f"add {a} and {b}", "")]) for a, b in [(2, 3), (7, 1), (4, 4)]]
    params = SamplingParams(max_new_tokens=4)
    assert merged_engine.generate(prompts, params) == with_adapter.generate(prompts, params)


def test_trl_dpo_trains_a_lab_model_adapter(sft_run, pretrained_dir, tmp_path):
    pairs = tmp_path / "pairs.json"
    records = [
        {"instruction": f"add {a} and {b}", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a in range(6)
        for b in range(6)
    ]
    pairs.write_text(json.dumps(records))
    config = sft_config(pretrained_dir, pairs, tmp_path / "dpo", max_steps=6, lr=5e-3, batch_size=8)
    config["method"] = {"name": "dpo"}
    config["adapter"]["path"] = str(sft_run.artifact)
    result = dpo.run(validate_config(config), quiet=True)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    margins = [row["rewards/margins"] for row in rows if "rewards/margins" in row]
    assert result.steps == 6 and margins[-1] > margins[0]
    assert (result.artifact / "adapter_model.safetensors").is_file()


def test_reward_head_loads_on_a_lab_model(lab_dir):
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(lab_dir)), reward=True, quiet=True)
    scores = model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]])).logits
    assert scores.shape == (2, 1)


def test_eager_and_sdpa_attention_agree_with_alibi_and_padding(tokenizer):
    spec = ArchSpec(tokenizer="unused", d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, position="alibi")
    model = build_model(spec, tokenizer)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        eager = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[1, 4:], eager[1, 4:], atol=1e-5, rtol=1e-5)


def test_lab_cli_builds_and_reports(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    arch = {
        "tokenizer": str(tmp_path / "tok"),
        "d_model": 48,
        "n_layers": 3,
        "n_heads": 6,
        "n_kv_heads": 2,
        "position": "yarn",
        "yarn": {"original_max_position_embeddings": 64},
        "max_position_embeddings": 256,
        "tie_embeddings": False,
    }
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(arch))
    runner = CliRunner()
    built = runner.invoke(
        app, ["lab", "build", str(tmp_path / "arch.yaml"), "--out", str(tmp_path / "model")]
    )
    assert built.exit_code == 0, built.output
    assert (tmp_path / "model" / "model.safetensors").is_file()
    info = runner.invoke(app, ["lab", "info", str(tmp_path / "model"), "--context", "128"])
    assert info.exit_code == 0, info.output
    for words in (
        "yarn",
        "grouped-query",
        "embeddings",
        "attention",
        "feed-forward",
        "output head",
        "FLOPs per token at 128",
    ):
        assert words in info.output, words
    # the YAML itself works too, without building weights
    assert runner.invoke(app, ["lab", "info", str(tmp_path / "arch.yaml")]).exit_code == 0

    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**arch, "n_head": 6}))
    failed = runner.invoke(app, ["lab", "build", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "x")])
    assert failed.exit_code == 1
    assert "unknown key `n_head` (did you mean `n_heads`?)" in failed.output
    assert not (tmp_path / "x").exists()
