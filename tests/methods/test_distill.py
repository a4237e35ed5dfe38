"""Distillation: the driver's loss is the formula's, accumulation is exact, vocabularies are
checked, sequence-level KD trains on the teacher's answers; and the learning test."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import sft_config
from lmforge.config import ConfigError, validate_config
from lmforge.methods import distill


def distill_config(student, teacher, data, out, **options) -> dict:
    raw = sft_config(student, data, out, **options.pop("train", {}))
    raw["method"] = {"name": "distill", "distill": {"teacher": str(teacher), **options}}
    return raw


def logged(output_dir, key="loss") -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_distillation_trains_the_student_adapter_with_both_loss_parts(tmp_path, base_dir, alpaca_file):
    before = load_file(base_dir / "model.safetensors")
    result = distill.run(
        validate_config(
            distill_config(base_dir, base_dir, alpaca_file, tmp_path / "run", temperature=2.0, alpha=0.5)
        ),
        quiet=True,
    )
    assert result.steps == 8
    kd, ce = logged(result.output_dir, "kd_loss"), logged(result.output_dir, "ce_loss")
    assert kd and ce
    assert kd[0] < 1e-3  # student = teacher at the start (LoRA B is zero): no divergence yet
    assert ce[-1] < ce[0]
    assert (result.artifact / "adapter_model.safetensors").is_file()
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher/base file untouched


def test_gradient_accumulation_equals_the_full_batch(tmp_path, base_dir, alpaca_file):
    """batch 8 x accum 1 and batch 4 x accum 2 reach the same adapter (the loss is summed over
    the accumulated batch's label tokens, not averaged per micro-batch)."""
    runs = {}
    for name, batch, accum in (("full", 8, 1), ("accum", 4, 2)):
        train = {"batch_size": batch, "grad_accum": accum, "max_steps": 3, "padding_free": False}
        raw = distill_config(
            base_dir, base_dir, alpaca_file, tmp_path / name, alpha=0.7, loss="jsd", train=train
        )
        runs[name] = load_file(
            distill.run(validate_config(raw), quiet=True).artifact / "adapter_model.safetensors"
        )
    for key in runs["full"]:
        torch.testing.assert_close(runs["full"][key], runs["accum"][key], atol=2e-5, rtol=1e-4)


def test_different_tokenizers_are_refused_with_the_way_out(tmp_path, base_dir, alpaca_file):
    from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny

    other_tokenizer = build_tiny_tokenizer(["completely different words here"] * 20, vocab_size=280)
    other = tmp_path / "other"
    save_tiny(
        build_tiny_llama(other_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0),
        other_tokenizer,
        other,
    )
    raw = distill_config(base_dir, other, alpaca_file, tmp_path / "run")
    with pytest.raises(ValueError, match="different tokenizers.*sequence_level: true"):
        distill.run(validate_config(raw), quiet=True)
    with pytest.raises(ConfigError, match=r"method.name distill needs method.distill with a teacher"):
        validate_config({**raw, "method": {"name": "distill"}})
    missing = distill_config(base_dir, tmp_path / "nowhere", alpaca_file, tmp_path / "run2")
    with pytest.raises(OSError, match="does not exist"):
        distill.run(validate_config(missing), quiet=True)


def test_sequence_level_trains_on_the_teachers_answers(tmp_path, base_dir, alpaca_file):
    raw = distill_config(
        base_dir, base_dir, alpaca_file, tmp_path / "run", sequence_level=True, max_new_tokens=4
    )
    result = distill.run(validate_config(raw), quiet=True)
    answers = [
        json.loads(line) for line in (result.output_dir / "teacher_answers.jsonl").read_text().splitlines()
    ]
    assert len(answers) == 100
    assert all(a["messages"][-1]["role"] == "assistant" for a in answers)
    assert result.steps == 8
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the student trained"
    assert "name: distill" in (result.output_dir / "config.yaml").read_text()
    # a rerun reuses the complete answers file instead of generating again
    stamp = (result.output_dir / "teacher_answers.jsonl").stat().st_mtime_ns
    shutil.rmtree(result.artifact)
    distill.run(validate_config(raw), quiet=True)
    assert (result.output_dir / "teacher_answers.jsonl").stat().st_mtime_ns == stamp
