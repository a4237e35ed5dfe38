"""Learning tests for the online RL stages, on the quickstart's digit-sorting task.

The start is the partly trained SFT adapter (`quickstart_sft`: about a quarter of held-out prompts
right greedily, fewer when sampled). The only reward is `exact_answer` against the record's
answer. GRPO and PPO each train 30-40 updates from that adapter with the seed pinned; the mean
reward of the sampled completions must rise clearly, and held-out greedy exact match must not fall.

The final-answer extraction is lenient (the last number counts), so a policy can earn the reward
with the right number followed by rambling. PPO found that (reward up, greedy exact match down)
until `missing_eos_penalty` charged completions that never stop, the standard fix (Huang et al.).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lmforge.config import validate_config
from lmforge.config.model import ModelConfig
from lmforge.data.synthetic import TaskExample, is_correct
from lmforge.data.templates import get_template
from lmforge.methods import grpo, ppo
from lmforge.models.loading import load_tokenizer
from lmforge.pipeline.preference_task import greedy_answers

pytestmark = pytest.mark.xdist_group("quickstart")


def exact_match(model_dir: Path, adapter: Path, held: list[TaskExample]) -> float:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    answers = greedy_answers(model, tokenizer, get_template("chatml"), [t.prompt for t in held])
    return sum(is_correct(a, t) for a, t in zip(answers, held, strict=True)) / len(held)


PPO = (
    "ppo",
    40,
    {
        "train": {"batch_size": 32, "lr": 5e-4},
        "ppo": {
            "rollout_batch_size": 8,
            "mini_batch_size": 32,
            "ppo_epochs": 2,
            "kl_coef": 0.02,
            "vf_coef": 0.5,
            "missing_eos_penalty": 1.0,
        },
    },
)


@pytest.mark.parametrize(
    ("method", "steps", "options"),
    [
        ("grpo", 30, {"train": {"batch_size": 64, "lr": 3e-4}}),  # 8 prompts x 8 completions per step
        PPO,
    ],
)
def test_online_rl_raises_the_reward(quickstart_run, quickstart_sft, tmp_path, method, steps, options):
    torch.set_num_threads(2)
    out, _ = quickstart_run
    raw = rl_config(out, quickstart_sft, tmp_path, method, steps, options)
    result = (grpo if method == "grpo" else ppo).run(validate_config(raw), quiet=True)
    assert_learned(out, quickstart_sft, tmp_path, result.artifact, method, steps)


def test_ppo_on_two_processes_raises_the_reward(quickstart_run, quickstart_sft, tmp_path):
    """lmforge's own PPO loop under DDP (docs/distributed.md): the same task and settings, each of
    2 processes rolling out 4 of the 8 prompts per update."""
    out, _ = quickstart_run
    method, steps, options = PPO
    raw = rl_config(out, quickstart_sft, tmp_path, method, steps, options)
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmforge", "train", str(config), "--nproc", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_learned(out, quickstart_sft, tmp_path, tmp_path / "adapter", method, steps)


def rl_config(out: Path, sft_adapter: Path, tmp_path: Path, method: str, steps: int, options: dict) -> dict:
    model_dir = out / "pretrain" / "model"
    return {
        "method": {
            "name": method,
            "rewards": [{"builtin": "exact_answer"}],
            "sampling": {"num_generations": 8, "temperature": 0.7, "max_completion_length": 10},
            "samples_every": 10,
            **({"ppo": options["ppo"]} if "ppo" in options else {}),
        },
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "path": str(sft_adapter)},
        "data": {"path": str(out / "data" / "sft_train.json"), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(tmp_path),
            "max_steps": steps,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            "save_steps": 0,
            **options["train"],
        },
    }


def assert_learned(out: Path, sft_adapter: Path, tmp_path: Path, adapter: Path, method: str, steps: int):
    """The sampled completions' mean reward rose; held-out greedy exact match did not fall."""
    model_dir = out / "pretrain" / "model"
    rewards = [
        row["reward"]
        for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "reward" in row
    ]
    assert len(rewards) == steps
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    held = [
        TaskExample(r["instruction"], r["output"])
        for r in json.loads((out / "data" / "heldout.json").read_text())[:100]
    ]
    before, after = (
        exact_match(model_dir, sft_adapter, held),
        exact_match(model_dir, adapter, held),
    )
    summary = f"held-out EM {before:.2f} -> {after:.2f}"
    print(f"{method}: mean reward {first:.2f} (first 8 steps) -> {last:.2f} (last 8 steps); {summary}")
    assert last >= first + 0.1, "the sampled completions earn more reward"
    assert after >= before, "greedy held-out exact match does not fall"
