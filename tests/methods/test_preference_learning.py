"""Learning tests for the preference stages, on the quickstart's digit-sorting task.

The starting point is a partly trained SFT adapter (about a quarter of held-out prompts right).
Its own wrong answers are the rejected side of each pair (`synthetic.preference_records`), so
the pairs teach it out of the mistakes it actually makes. Each method then trains 20 steps; on
held-out prompts the preference accuracy must rise and greedy exact match must not fall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmforge.config import validate_config
from lmforge.config.model import ModelConfig
from lmforge.data.synthetic import TaskExample
from lmforge.data.templates import get_template
from lmforge.methods import dpo, kto
from lmforge.models.loading import load_tokenizer
from lmforge.pipeline.preference_task import judge, write_pairs
from lmforge.training.preference import PairScores

pytestmark = pytest.mark.xdist_group("quickstart")
TEMPLATE = get_template("chatml")
# Per-method learning rates at the scale each method needs: ORPO carries its own NLL term and,
# like SFT, wants a larger one.
LEARNING_RATE = {"dpo": 5e-4, "orpo": 2e-3, "simpo": 5e-4, "kto": 5e-4}


@dataclass
class Start:
    model: Path
    adapter: Path
    pairs: Path
    held_pairs: Path
    held: list[TaskExample]
    scores: PairScores
    exact_match: float


def stage_config(model: Path, data: Path, out: Path, method: str, **train) -> dict:
    return {
        "method": {"name": method},
        "model": {"name_or_path": str(model)},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(data), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(out),
            "batch_size": 16,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def with_adapter(model: Path, adapter: Path):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter).eval()


def tasks(path: Path, n: int) -> list[TaskExample]:
    return [TaskExample(r["instruction"], r["output"]) for r in json.loads(path.read_text())[:n]]


@pytest.fixture(scope="module")
def start(quickstart_run, quickstart_sft, tmp_path_factory) -> Start:
    out, _ = quickstart_run
    model = out / "pretrain" / "model"
    work = tmp_path_factory.mktemp("preference-learning")
    adapter = quickstart_sft
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model)))
    sft_model = with_adapter(model, adapter)
    held = tasks(out / "data" / "heldout.json", 100)
    pairs = write_pairs(
        sft_model, tokenizer, TEMPLATE, tasks(out / "data" / "sft_train.json", 400), work / "pairs.json"
    )
    held_pairs = write_pairs(sft_model, tokenizer, TEMPLATE, held, work / "held_pairs.json", seed=1)
    scores, exact = judge(sft_model, tokenizer, TEMPLATE, held, held_pairs)
    return Start(model, adapter, pairs, held_pairs, held, scores, exact)


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
def test_preference_training_raises_preference_accuracy_and_keeps_exact_match(start, tmp_path, method):
    torch.set_num_threads(2)
    raw = stage_config(start.model, start.pairs, tmp_path, method, max_steps=20, lr=LEARNING_RATE[method])
    raw["adapter"]["path"] = str(start.adapter)
    raw["data"]["eval_path"] = str(start.held_pairs)
    result = (kto if method == "kto" else dpo).run(validate_config(raw), quiet=True)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(start.model)))
    model = with_adapter(start.model, result.artifact)
    scores, exact = judge(model, tokenizer, TEMPLATE, start.held, start.held_pairs)
    before, after = start.scores.normalized_accuracy(), scores.normalized_accuracy()
    implicit = scores.implicit_accuracy(start.scores)
    print(
        f"{method}: held-out preference accuracy {before:.2f} -> {after:.2f} (implicit reward vs. start "
        f"{implicit:.2f}); exact match {start.exact_match:.2f} -> {exact:.2f}"
    )
    assert implicit >= 0.8, "the implicit reward prefers the right answer on held-out pairs"
    assert after >= before + 0.15
    assert exact >= start.exact_match


def test_reward_model_ranks_held_out_pairs(start, tmp_path):
    from lmforge.inference.reward import RewardModel
    from lmforge.methods import reward

    torch.set_num_threads(2)
    raw = stage_config(start.model, start.pairs, tmp_path, "reward", max_steps=40, lr=2e-3)
    result = reward.run(validate_config(raw), quiet=True)
    model = RewardModel.load(result.artifact)
    pairs = json.loads(start.held_pairs.read_text())
    chosen = model.score([(r["instruction"], r["chosen"]) for r in pairs])
    rejected = model.score([(r["instruction"], r["rejected"]) for r in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    print(f"reward: held-out pair accuracy {accuracy:.2f}")
    assert accuracy >= 0.75
