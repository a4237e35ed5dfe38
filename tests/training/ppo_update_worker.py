"""One PPO update from a fixed rollout, in this process (run alone or by torchrun): each process
takes its share of the rollout's 8 completions; rank 0 writes the update's statistics and the
trained weights to OUT.json / OUT.safetensors. Used by test_distributed.py to show that 2
processes update as one (gradients averaged, advantages whitened over the whole rollout).

    python ppo_update_worker.py BASE_DIR OUT"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge import distributed
from lmforge.config import validate_config
from lmforge.methods.ppo import critic_for
from lmforge.training.ppo import PPOLoop, trainable_state
from lmforge.training.stage import load_model_for_training

COMPLETIONS, PROMPT, LENGTH = 8, 5, 6


def main(base_dir: str, out: str) -> None:
    distributed.start("cpu")
    raw = {
        "method": {"name": "ppo", "rewards": [{"builtin": "regex", "pattern": "a"}]},
        "model": {"name_or_path": base_dir},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": "unused.json", "template": "chatml"},
        "train": {"output_dir": out, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0},
    }
    raw["method"]["ppo"] = {"rollout_batch_size": 4, "mini_batch_size": COMPLETIONS, "ppo_epochs": 2}
    config = validate_config(raw)
    model, _ = load_model_for_training(config, quiet=True, total_steps=2)
    model.eval()
    loop = PPOLoop(model, critic_for(config, model), config.method.ppo, 1.0, config.train, 2)
    generator = torch.Generator().manual_seed(0)  # the same rollout in every process
    ids = torch.randint(3, 300, (COMPLETIONS, PROMPT + LENGTH), generator=generator)
    scores = torch.randn(COMPLETIONS, generator=generator)
    mask = torch.ones(COMPLETIONS, LENGTH, dtype=torch.bool)  # every completion full length
    share = COMPLETIONS // distributed.world_size()
    mine = slice(distributed.rank() * share, (distributed.rank() + 1) * share)
    roll = {
        "ids": ids[mine],
        "attention": torch.ones_like(ids[mine]),
        "mask": mask[mine],
        "stopped": mask[mine, 0],
        "prompt_len": PROMPT,
        "tokens": int(mask[mine].sum()),
    }
    record = loop.step(roll, scores[mine])
    if distributed.is_main():
        Path(f"{out}.json").write_text(json.dumps(record))
        critic = {f"critic.{k}": v for k, v in trainable_state(loop.critic).items()}
        save_file({**trainable_state(model), **critic}, f"{out}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
