"""Online RL speed: rollout tokens/s with and without the KV cache, and where a step's time goes.

Starts from the same point as the learning tests and `bench/preference.py`: the quickstart model
with a 30-step LoRA SFT adapter on the digit-sorting task (prepared once in --workdir).

1. Rollout throughput: 32 prompts x 8 completions, exactly --new-tokens new tokens each (min =
   max, so both runs generate the same number), sampled with the KV cache on and off; 2 repeats,
   the faster kept.
2. Step split: GRPO (trl's GRPOTrainer) and PPO (lmforge's loop) for --steps updates with the
   learning tests' settings; per step, generation / scoring / optimization seconds. PPO logs the
   split itself; for GRPO the policy's `generate` is timed from outside (this script only) and the
   rewards time themselves; optimization is the rest of the step.

Usage::

    .venv/bin/python bench/rl.py --out bench/rl.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from preference import prepare  # noqa: E402  (the shared starting point)


def policy(workdir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = json.loads((workdir / "preference" / "start.json").read_text())["adapter"]
    base = AutoModelForCausalLM.from_pretrained(workdir / "pretrain" / "model")
    return PeftModel.from_pretrained(base, adapter).eval(), adapter


def rollout_throughput(workdir: Path, new_tokens: int) -> dict:
    from lmforge.config.model import ModelConfig
    from lmforge.data.templates import Conversation, get_template
    from lmforge.models.loading import load_tokenizer

    model, _ = policy(workdir)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(workdir / "pretrain" / "model")))
    tokenizer.padding_side = "left"
    records = json.loads((workdir / "data" / "sft_train.json").read_text())[:32]
    template = get_template("chatml")
    texts = [
        template.generation_prompt(Conversation(turns=[(r["instruction"], "")]), tokenizer) for r in records
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    result = {}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(2):
            torch.manual_seed(0)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=0.7,
                    num_return_sequences=8,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=use_cache,
                )
            best = min(best, time.perf_counter() - start)
        generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        result["kv_cache" if use_cache else "no_cache"] = {"seconds": best, "tokens_per_s": generated / best}
    result["speedup"] = result["kv_cache"]["tokens_per_s"] / result["no_cache"]["tokens_per_s"]
    return result


def rl_config(workdir: Path, method: str, steps: int) -> dict:
    adapter = json.loads((workdir / "preference" / "start.json").read_text())["adapter"]
    train = {"batch_size": 64, "lr": 3e-4} if method == "grpo" else {"batch_size": 32, "lr": 5e-4}
    ppo = {"rollout_batch_size": 8, "mini_batch_size": 32, "ppo_epochs": 2, "kl_coef": 0.02, "vf_coef": 0.5}
    return {
        "method": {
            "name": method,
            "rewards": [{"builtin": "exact_answer"}],
            "sampling": {"num_generations": 8, "temperature": 0.7, "max_completion_length": 10},
            "samples_every": 0,
            **({"ppo": {**ppo, "missing_eos_penalty": 1.0}} if method == "ppo" else {}),
        },
        "model": {"name_or_path": str(workdir / "pretrain" / "model")},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "path": adapter},
        "data": {"path": str(workdir / "data" / "sft_train.json"), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(workdir / "rl" / method),
            "max_steps": steps,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            "save_steps": 0,
            **train,
        },
    }


def step_split(workdir: Path, method: str, steps: int) -> dict:
    import shutil

    from lmforge.config import validate_config
    from lmforge.methods import grpo, ppo

    out = workdir / "rl" / method
    shutil.rmtree(out, ignore_errors=True)
    config = validate_config(rl_config(workdir, method, steps), source="bench")
    if method == "ppo":
        ppo.run(config, quiet=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        split = {
            k: sum(r[f"time/{k}"] for r in rows) / len(rows)
            for k in ("generation", "scoring", "optimization")
        }
        tokens = sum(r["completions/mean_length"] * 64 for r in rows)  # 8 prompts x 8 completions
        return {**split, "rollout_tokens_per_s": tokens / sum(r["time/generation"] for r in rows)}
    # GRPO: time the policy's generate (and count its real tokens) from outside trl; the rewards
    # time themselves (RewardSource.seconds).
    timing: dict = {"generation": 0.0, "tokens": 0, "sources": []}
    original = grpo.ForgeGRPOTrainer.__init__

    def timed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        generate, pad = model.generate, model.generation_config.pad_token_id

        def timed_generate(*a, **k):
            start = time.perf_counter()
            out = generate(*a, **k)
            timing["generation"] += time.perf_counter() - start
            timing["tokens"] += int((out[:, k["input_ids"].shape[1] :] != pad).sum())
            return out

        model.generate = timed_generate
        timing["sources"] = kwargs["reward_funcs"]

    grpo.ForgeGRPOTrainer.__init__ = timed_init
    try:
        result = grpo.run(config, quiet=True)
    finally:
        grpo.ForgeGRPOTrainer.__init__ = original
    scoring = sum(source.seconds for source in timing["sources"])
    optimization = result.metrics["train_runtime"] - timing["generation"] - scoring
    return {
        "generation": timing["generation"] / steps,
        "scoring": scoring / steps,
        "optimization": optimization / steps,
        "rollout_tokens_per_s": timing["tokens"] / timing["generation"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-preference"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    prepare(a.workdir)
    cache = rollout_throughput(a.workdir, a.new_tokens)
    on, off = cache["kv_cache"]["tokens_per_s"], cache["no_cache"]["tokens_per_s"]
    print(
        f"rollout, 256 completions x {a.new_tokens} new tokens: KV cache {on:.0f} tok/s, "
        f"no cache {off:.0f} tok/s ({cache['speedup']:.2f}x)"
    )
    splits = {method: step_split(a.workdir, method, a.steps) for method in ("grpo", "ppo")}
    print(
        f"{'method':<6} {'generation s':>13} {'scoring s':>10} {'optimization s':>15} {'rollout tok/s':>14}"
    )
    for method, s in splits.items():
        times = f"{s['generation']:>13.3f} {s['scoring']:>10.4f} {s['optimization']:>15.3f}"
        print(f"{method:<6} {times} {s['rollout_tokens_per_s']:>14.0f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"rollout": cache, "steps": a.steps, "split": splits}, indent=2))


if __name__ == "__main__":
    main()
