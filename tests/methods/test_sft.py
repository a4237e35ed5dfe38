"""SFT stage behaviour: what trains and what stays frozen, exact resume, NaN stops, artifacts."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import pack, tokenize_examples
from lmforge.methods import sft
from lmforge.models.loading import load_tokenizer
from lmforge.training.callbacks import NonFiniteError
from lmforge.training.checkpoints import COMPLETE_MARKER
from lmforge.training.stage import load_model_for_training
from lmforge.training.trainer import build_trainer


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_lora_trains_adapter_only_and_writes_artifacts(tmp_path, base_dir, alpaca_file):
    base = load_file(base_dir / "model.safetensors")
    result = sft.run(validate_config(sft_config(base_dir, alpaca_file, tmp_path / "run")), quiet=True)
    out = result.output_dir
    assert result.steps == 8
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "adapter/lmforge_template.txt",
        "adapter/README.md",
    ):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")), "only safetensors are written"
    assert "# resolved by lmforge" in (out / "config.yaml").read_text()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    assert not any(k.endswith(("q_proj.weight", "embed_tokens.weight")) for k in adapter), "base not saved"
    # The base files are untouched by training.
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(base[k], after[k]) for k in base)
    # Loss went down over 8 steps on a learnable task.
    seen = losses(out)
    assert seen[8] < seen[1]


def test_resume_from_latest_complete_checkpoint_matches_uninterrupted(tmp_path, base_dir, alpaca_file):
    full = tmp_path / "full"
    sft.run(
        validate_config(sft_config(base_dir, alpaca_file, full, save_steps=4, save_total_limit=None)),
        quiet=True,
    )
    assert (full / "checkpoint-4" / "training_args.json").is_file()
    assert not list(full.rglob("*.bin")), "no pickled training arguments in checkpoints"
    # Simulate a run killed after step 4: its checkpoint-4 is complete; a later save was cut off midway.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-4", killed / "checkpoint-4")
    shutil.copytree(full / "checkpoint-8", killed / "checkpoint-6")
    (killed / "checkpoint-6" / COMPLETE_MARKER).unlink()
    sft.run(
        validate_config(sft_config(base_dir, alpaca_file, killed, save_steps=4, resume="auto")), quiet=True
    )
    resumed = losses(killed)
    assert min(resumed) == 5, "resumed from checkpoint-4, not the incomplete checkpoint-6"
    uninterrupted = losses(full)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6)
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_batch_times_accumulation_is_equivalent(tmp_path, base_dir, alpaca_file):
    one = sft.run(
        validate_config(
            sft_config(base_dir, alpaca_file, tmp_path / "a", max_steps=2, batch_size=8, grad_accum=1)
        ),
        quiet=True,
    )
    two = sft.run(
        validate_config(
            sft_config(base_dir, alpaca_file, tmp_path / "b", max_steps=2, batch_size=2, grad_accum=4)
        ),
        quiet=True,
    )
    a = load_file(one.artifact / "adapter_model.safetensors")
    b = load_file(two.artifact / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_non_finite_loss_stops_and_names_step(tmp_path, base_dir, alpaca_file):
    config = validate_config(
        sft_config(
            base_dir,
            alpaca_file,
            tmp_path / "nan",
            lr=1e30,
            max_grad_norm=1e30,
            warmup_ratio=0.0,
            scheduler="constant",
        )
    )
    with pytest.raises(NonFiniteError, match=r"at step \d+"):
        sft.run(config, quiet=True)


def test_padding_free_gives_same_loss(tmp_path, base_dir, alpaca_file):
    def run(name, padding_free):
        config = sft_config(base_dir, alpaca_file, tmp_path / name, max_steps=3, padding_free=padding_free)
        return losses(sft.run(validate_config(config), quiet=True).output_dir)

    padded, free = run("p", False), run("f", True)
    assert free.keys() == padded.keys()
    for step, loss in padded.items():
        assert free[step] == pytest.approx(loss, rel=1e-5), step


def test_group_by_length_batches_similar_lengths(tmp_path, base_dir, tokenizer):
    rng = random.Random(0)
    records = [
        {"instruction": "say words", "input": "", "output": " ".join(["cat"] * rng.randint(1, 40))}
        for _ in range(64)
    ]
    data = tmp_path / "varied.json"
    data.write_text(json.dumps(records))

    def batch_spread(group_by_length: bool) -> float:
        config = validate_config(
            sft_config(base_dir, data, tmp_path / str(group_by_length), group_by_length=group_by_length)
        )
        template = get_template("chatml")
        dataset, _ = tokenize_examples(load_examples(config.data, "sft").train, template, tokenizer, 64)
        model, hardware = load_model_for_training(config, quiet=True)
        trainer = build_trainer(config, model, tokenizer, hardware, dataset, None, "sft", quiet=True)
        order = list(trainer._get_train_sampler())
        lengths = [len(dataset[i]["input_ids"]) for i in order]
        batches = [lengths[i : i + 4] for i in range(0, len(lengths), 4)]
        return sum(max(b) - min(b) for b in batches) / len(batches)

    assert batch_spread(True) < 0.5 * batch_spread(False)
    result = sft.run(
        validate_config(sft_config(base_dir, data, tmp_path / "run", group_by_length=True)), quiet=True
    )
    assert result.steps == 8


def test_sft_rejects_text_data_before_loading_a_model(tmp_path, base_dir):
    data = tmp_path / "t.json"
    data.write_text(json.dumps([{"text": "hello"}]))
    with pytest.raises(ValueError, match="pretrain"):
        sft.run(validate_config(sft_config(base_dir, data, tmp_path / "x")), quiet=True)


def test_gradient_checkpointing_changes_memory_not_math(tmp_path, base_dir, alpaca_file):
    plain = sft.run(
        validate_config(sft_config(base_dir, alpaca_file, tmp_path / "a", max_steps=3)), quiet=True
    )
    config = sft_config(base_dir, alpaca_file, tmp_path / "b", max_steps=3, gradient_checkpointing=True)
    checkpointed = sft.run(validate_config(config), quiet=True)
    for step, loss in losses(plain.output_dir).items():
        assert losses(checkpointed.output_dir)[step] == pytest.approx(loss, rel=1e-5)


def test_val_size_split_and_tensorboard(tmp_path, base_dir, alpaca_file):
    config = sft_config(base_dir, alpaca_file, tmp_path / "e", max_steps=4, tensorboard=True)
    config["data"]["val_size"] = 0.1
    result = sft.run(validate_config(config), quiet=True)
    assert result.stats.examples == 90
    assert "eval_loss" in result.metrics
    assert list((result.output_dir / "runs").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in rows)


def test_packed_training_feeds_whole_rows_and_learns(tmp_path, base_dir, alpaca_file):
    config = sft_config(base_dir, alpaca_file, tmp_path / "packed", max_steps=8, padding_free=False)
    config["data"]["packing"] = True
    config = validate_config(config)
    tokenizer = load_tokenizer(config.model)
    data = load_examples(config.data, "sft").train
    dataset, stats = tokenize_examples(data, get_template("chatml"), tokenizer, 64)
    packed = pack(dataset, 64)
    model, hardware = load_model_for_training(config, quiet=True)
    trainer = build_trainer(config, model, tokenizer, hardware, packed, None, "sft", quiet=True)
    # SDPA on CPU: packed rows stay rows, position ids restart per example, no attention mask
    batch = trainer.data_collator([packed[0], packed[1]])
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
    starts = int((batch["position_ids"] == 0).sum())
    assert starts >= len(packed[0]["seq_lengths"]) + len(packed[1]["seq_lengths"])
    result = sft.run(config, quiet=True)
    seen = losses(result.output_dir)
    assert result.steps == 8 and seen[8] < seen[1]
    assert len(packed) * 2 <= stats.examples  # ~25-token examples, two per 64-token row
    assert sum(len(row) for row in packed["input_ids"]) == stats.tokens


def test_streaming_trains_for_max_steps(tmp_path, base_dir, alpaca_file):
    config = sft_config(base_dir, alpaca_file, tmp_path / "stream", max_steps=3)
    config["data"]["streaming"] = True
    result = sft.run(validate_config(config), quiet=True)
    assert result.steps == 3
    adapter = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the streamed rows trained it"
    logged = losses(result.output_dir)
    assert sorted(logged) == [1, 2, 3] and all(map(math.isfinite, logged.values()))
    config["train"]["max_steps"] = -1
    with pytest.raises(ValueError, match="set train.max_steps"):
        sft.check(validate_config(config))
