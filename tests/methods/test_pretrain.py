"""Pre-training: document-aware blocks, lab models from scratch, every optimizer, schedules,
streaming and mixing, and the learning test (held-out perplexity falls; SFT + LoRA follows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, get_scheduler

from lmforge.config import ConfigError, validate_config
from lmforge.config.train import TrainConfig
from lmforge.data.synthetic import pretrain_corpus, tokenizer_corpus
from lmforge.data.tokenize import IGNORE, PackedRowsCollator, text_blocks
from lmforge.methods import pretrain, sft
from lmforge.models.tiny import build_tiny_tokenizer
from lmforge.training.trainer import schedule_arguments


@pytest.fixture(scope="module")
def lab_setup(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer folder, an architecture YAML, a training corpus and held-out lines."""
    root = tmp_path_factory.mktemp("lab")
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=160)
    tokenizer.save_pretrained(root / "tokenizer")
    arch = {
        "tokenizer": str(root / "tokenizer"),
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "position": "rope",
        "max_position_embeddings": 128,
    }
    (root / "arch.yaml").write_text(yaml.safe_dump(arch))
    train_lines = pretrain_corpus(0, 1500, set())
    heldout = [line for line in pretrain_corpus(7, 300, set()) if line not in set(train_lines)][:150]
    (root / "corpus.json").write_text(json.dumps([{"text": line} for line in train_lines]))
    (root / "notes.txt").write_text("\n".join(f"note number {i} says hello" for i in range(50)) + "\n")
    (root / "heldout.json").write_text(json.dumps(heldout))
    return {
        "root": root,
        "arch": root / "arch.yaml",
        "corpus": root / "corpus.json",
        "notes": root / "notes.txt",
    }


def pretrain_config(setup: dict[str, Path], out: Path, **train) -> dict:
    return {
        "method": {"name": "pretrain"},
        "model": {"arch": str(setup["arch"])},
        "adapter": {"method": "none"},
        "data": {"path": str(setup["corpus"]), "max_length": 64},
        "train": {
            "output_dir": str(out),
            "max_steps": 20,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 2,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def logged_losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def heldout_perplexity(model, tokenizer, lines: list[str]) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor(
                [tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
            )
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


# --- blocks and boundaries -------------------------------------------------------------------


def test_blocks_record_document_pieces_and_split_long_documents():
    documents = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]
    rows = list(text_blocks(documents, max_length=4))
    assert [row["input_ids"] for row in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert [row["seq_lengths"] for row in rows] == [[3, 1], [4], [2, 2]]
    assert all(row["labels"] == row["input_ids"] for row in rows)
    stream = list(text_blocks(documents, max_length=4, boundaries=False))
    assert [row["input_ids"] for row in stream] == [row["input_ids"] for row in rows]
    assert all("seq_lengths" not in row for row in stream)


def test_collator_restarts_positions_and_masks_each_documents_first_label():
    batch = PackedRowsCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]}]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]


def test_packed_block_loss_equals_separate_documents(lab_setup):
    """With boundaries, a block's loss is the token-weighted mean of its documents' own losses:
    no document sees the one before it."""
    from lmforge.lab.build import new_model
    from lmforge.models.loading import arch_tokenizer

    tokenizer = arch_tokenizer(lab_setup["arch"])
    model = new_model(lab_setup["arch"], tokenizer, "sdpa")
    model.config.use_cache = False
    docs = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for t in ("sort 31 -> 13", "a cat")
    ]
    row = next(text_blocks(docs, max_length=64))
    batch = PackedRowsCollator(tokenizer.pad_token_id)([row])
    with torch.no_grad():
        packed = model(**batch).loss
        losses = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss for d in docs]
    weights = [len(d) - 1 for d in docs]
    expected = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {"arch": "a.yaml", "name_or_path": "m"}}, "not both"),
        ({"method": {"name": "sft"}}, "only method.name pretrain"),
        ({"adapter": {"method": "lora"}}, "set adapter.method: none"),
        (
            {
                "method": {"name": "dpo"},
                "model": {"name_or_path": "m"},
                "adapter": {"method": "lora"},
                "train": {"optimizer": "sophia"},
            },
            "sophia",
        ),
        (
            {"train": {"optimizer": "muon", "optimizer_args": {"betas": [0.9, 0.9]}}},
            "did you mean `adamw_betas`",
        ),
        (
            {"train": {"scheduler": "linear", "min_lr_ratio": 0.1}},
            "applies to scheduler cosine or polynomial",
        ),
        (
            {
                "method": {"name": "sft", "document_boundaries": False},
                "model": {"name_or_path": "m"},
                "adapter": {"method": "lora"},
            },
            "applies to pretrain",
        ),
    ],
)
def test_bad_combinations_are_named(changes, message):
    config = {
        "method": {"name": "pretrain"},
        "model": {"arch": "a.yaml"},
        "adapter": {"method": "none"},
        "data": {"path": "x.txt"},
    }
    for section, values in changes.items():
        config[section] = values if section == "model" else {**config.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_packing_option_is_refused_for_pretraining(lab_setup, tmp_path):
    config = pretrain_config(lab_setup, tmp_path / "run")
    config["data"]["packing"] = True
    with pytest.raises(ValueError, match="pre-training always packs"):
        pretrain.run(validate_config(config), quiet=True)


@pytest.mark.parametrize(
    ("scheduler", "extra", "final"),
    [
        ("cosine", {"min_lr_ratio": 0.1}, 0.1),
        ("polynomial", {"min_lr_ratio": 0.2, "scheduler_power": 2.0}, 0.2),
        ("linear", {}, 0.0),
        ("none", {}, 1.0),
    ],
)
def test_schedules_warm_up_then_decay_to_their_floor(scheduler, extra, final):
    train = TrainConfig(scheduler=scheduler, lr=1.0, **extra)
    schedule = schedule_arguments(train)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(
        schedule["lr_scheduler_type"],
        optimizer,
        4,
        20,
        scheduler_specific_kwargs=schedule.get("lr_scheduler_kwargs"),
    )
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == 0.0 and rates[2] == pytest.approx(0.5) and rates[4] == pytest.approx(1.0)  # warmup
    assert rates[-1] == pytest.approx(final, abs=1e-6)
    if scheduler == "polynomial":  # (1 - 0.2) * (1 - t)^2 + 0.2 at t = 8/16
        assert rates[12] == pytest.approx(0.8 * 0.5**2 + 0.2)


# --- optimizers ------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": {"lr": 3e-3, "optimizer_args": {"betas": [0.9, 0.95]}},
    "adafactor": {"lr": 3e-2},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "sophia": {"lr": 3e-3, "optimizer_args": {"rho": 1.0, "hessian_every": 2}},
    "muon": {"lr": 3e-3},
    "sgd": {"lr": 0.3, "optimizer_args": {"momentum": 0.9}},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_lowers_the_pretraining_loss(name, lab_setup, tmp_path):
    settings = OPTIMIZERS[name]
    config = pretrain_config(lab_setup, tmp_path / name, optimizer=name, max_steps=25, **settings)
    result = pretrain.run(validate_config(config), quiet=True)
    losses = logged_losses(result.output_dir)
    assert result.steps == 25
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first - 1.0, (name, first, last)


def test_sophia_estimates_its_hessian_every_k_steps(lab_setup, tmp_path):
    from lmforge.training import trainer as trainer_module

    calls = []
    original = trainer_module.estimate_hessian

    def counting(model, inputs, optimizer):
        calls.append(1)
        return original(model, inputs, optimizer)

    trainer_module.estimate_hessian = counting
    try:
        config = pretrain_config(
            lab_setup,
            tmp_path / "sophia",
            optimizer="sophia",
            max_steps=6,
            grad_accum=2,
            optimizer_args={"hessian_every": 3},
        )
        pretrain.run(validate_config(config), quiet=True)
    finally:
        trainer_module.estimate_hessian = original
    assert len(calls) == 2  # steps 0 and 3, once per step despite 2 micro-batches each


# --- data: mixing, streaming -----------------------------------------------------------------


def test_streamed_mixed_pretraining_runs_its_steps(lab_setup, tmp_path):
    config = pretrain_config(lab_setup, tmp_path / "stream", max_steps=6)
    config["data"] = {
        "datasets": [
            {"path": str(lab_setup["corpus"]), "weight": 3},
            {"path": str(lab_setup["notes"]), "weight": 1},
        ],
        "mix": "interleave_over",
        "streaming": True,
        "max_length": 64,
    }
    result = pretrain.run(validate_config(config), quiet=True)
    assert result.steps == 6
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("num_input_tokens_seen", 0) for row in rows) == 6 * 8 * 64


# --- the learning test -----------------------------------------------------------------------


def test_pretraining_a_lab_model_lowers_heldout_perplexity_then_sft_lora_works(lab_setup, tmp_path):
    from lmforge.lab.build import new_model
    from lmforge.models.loading import arch_tokenizer

    tokenizer = arch_tokenizer(lab_setup["arch"])
    heldout = json.loads((lab_setup["root"] / "heldout.json").read_text())
    before = heldout_perplexity(new_model(lab_setup["arch"], tokenizer, "sdpa"), tokenizer, heldout)

    config = pretrain_config(
        lab_setup, tmp_path / "pretrain", max_steps=150, batch_size=16, lr=5e-3, save_steps=75
    )
    config["train"]["scheduler"] = "cosine"
    result = pretrain.run(validate_config(config), quiet=True)
    model = AutoModelForCausalLM.from_pretrained(result.artifact)
    after = heldout_perplexity(model, tokenizer, heldout)
    assert after < before / 10, (before, after)
    print(f"held-out perplexity {before:.1f} -> {after:.2f}")

    # SFT + LoRA on the pre-trained lab model through the normal path, starting from an
    # intermediate checkpoint's weights (the optimizer state is not carried over).
    records = [
        {"instruction": f"sort {d}", "input": "", "output": "".join(sorted(d))}
        for d in ("3142", "975", "8061", "5523")
    ] * 8
    (tmp_path / "sft.json").write_text(json.dumps(records))
    sft_config = {
        "model": {"name_or_path": str(result.output_dir / "checkpoint-75")},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(tmp_path / "sft.json"), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(tmp_path / "sft"),
            "max_steps": 40,
            "batch_size": 8,
            "lr": 1e-2,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
        },
    }
    tuned = sft.run(validate_config(sft_config), quiet=True)
    losses = logged_losses(tuned.output_dir)
    assert losses[-1] < losses[0] / 2, losses
    assert (tuned.artifact / "adapter_model.safetensors").is_file()
