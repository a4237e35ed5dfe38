"""Learning test for distillation, on the quickstart's digit-sorting task.

The teacher (the quickstart's 4-layer model, fully fine-tuned) knows the task. The student is
smaller (the same model cut to its first 2 layers). The training file is what distillation is
for in practice: instructions whose answers are unreliable — half of them are reversed. A student
trained on those hard labels learns the noise; distilled (alpha 1: the teacher's distributions
only, the answers serve as positions to learn), it learns the teacher's task. Same student, data,
steps and learning rate for both.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config import validate_config
from lmforge.config.model import ModelConfig
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.methods import distill, sft
from lmforge.models.loading import load_tokenizer

pytestmark = pytest.mark.xdist_group("quickstart")


def exact_match(model: Path, held: list[dict]) -> float:
    engine = Engine.load(str(model), template="chatml")
    prompts = [Conversation(turns=[(r["instruction"], "")]) for r in held]
    answers = engine.generate(prompts, SamplingParams(max_new_tokens=12), batch_size=64)
    return sum(a.strip() == r["output"] for a, r in zip(answers, held, strict=True)) / len(held)


def stage(model: Path, data: Path, out: Path, steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "adapter": {"method": "none"},
        "data": {"path": str(data), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "logging_steps": 10,
            "progress": False,
            "tensorboard": False,
        },
    }


def test_distilled_student_reaches_the_teacher_where_hard_labels_do_not(quickstart_run, tmp_path):
    torch.set_num_threads(2)
    out, _ = quickstart_run
    base, data = out / "pretrain" / "model", out / "data"
    held = json.loads((data / "heldout.json").read_text())[:200]

    teacher = sft.run(
        validate_config(stage(base, data / "sft_train.json", tmp_path / "teacher", 60)), quiet=True
    )
    teacher_em = exact_match(teacher.artifact, held)

    full = AutoModelForCausalLM.from_pretrained(base)
    config = full.config
    config.num_hidden_layers = 2
    student = type(full)(config)
    missing, _ = student.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    student.save_pretrained(tmp_path / "student")
    load_tokenizer(ModelConfig(name_or_path=str(base))).save_pretrained(tmp_path / "student")

    records = json.loads((data / "sft_train.json").read_text())
    rng = random.Random(0)
    noisy = [dict(r, output=r["output"][::-1]) if rng.random() < 0.5 else r for r in records]
    (tmp_path / "noisy.json").write_text(json.dumps(noisy))

    hard = sft.run(
        validate_config(stage(tmp_path / "student", tmp_path / "noisy.json", tmp_path / "hard", 80)),
        quiet=True,
    )
    raw = stage(tmp_path / "student", tmp_path / "noisy.json", tmp_path / "kd", 80)
    raw["method"] = {
        "name": "distill",
        "distill": {"teacher": str(teacher.artifact), "alpha": 1.0, "temperature": 1.0},
    }
    distilled = distill.run(validate_config(raw), quiet=True)

    hard_em, kd_em = exact_match(hard.artifact, held), exact_match(distilled.artifact, held)
    print(f"held-out exact match: teacher {teacher_em:.3f}, hard labels {hard_em:.3f}, distilled {kd_em:.3f}")
    assert teacher_em >= 0.9
    assert kd_em >= 0.85 * teacher_em, "the distilled student reaches most of the teacher's accuracy"
    assert kd_em >= hard_em + 0.2, "clearly above the same student on the hard labels"
