"""Prompts + rewards -> an adapter: PPO for RLHF (Ziegler et al., 2019; Ouyang et al., 2022), our own loop.

trl has no stable PPO. This driver follows "The N implementation details of RLHF with PPO"
(Huang et al., 2024); the math is in `losses/ppo.py`, tested on hand-computed values, the loop's
machinery (critic, rollout, update, checkpoints) in `training/ppo.py`. One update:

1. rollout: `ppo.rollout_batch_size` prompts, `sampling.num_generations` completions each, sampled
   with the KV cache on; a completion ends at the template's stop token;
2. score: `method.rewards` on the decoded text, weighted and summed, is the sequence score
   (`ppo.missing_eos_penalty` is subtracted from completions that never stop);
3. old log-probs and values from the policy, reference log-probs from the reference, without grad;
4. per-token reward -kl_coef x KL(policy || reference), plus the score on the last token; GAE with
   `gamma` and `lam`; advantages whitened over the rollout;
5. `ppo.ppo_epochs` passes over shuffled mini-batches of `ppo.mini_batch_size` completions (micro
   batches of `train.batch_size`): clipped policy loss + vf_coef x clipped value loss - entropy_coef x
   entropy, one optimizer step per mini-batch;
6. the KL controller (fixed, or adaptive with `kl_target`/`kl_horizon`) updates from the mean KL.

Where it departs from classic RLHF PPO:
- the critic is by default a scalar head on the policy's own (adapted) last hidden state, sharing
  the trunk as trl's former value-head model did; InstructGPT trains a separate value model
  (`ppo.critic: separate`: its own base and LoRA adapter);
- the reference costs no memory: the starting model is the policy with its adapter disabled, or,
  when `adapter.path` continues an SFT adapter, a frozen copy of that adapter ("ref"), never the
  bare base;
- dropout is off throughout (the model stays in eval mode), so the old and new log-probs of an
  unchanged policy agree and the first ratio is exactly 1 (Huang et al., detail 4);
- log-probs are taken from logits divided by the sampling temperature, as they were sampled.

A step is one update. `train.max_steps` updates, or `train.epochs` passes over the prompts.
"""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from lmforge import distributed
from lmforge.adapters.build import final_adapter
from lmforge.artifacts import save_artifact
from lmforge.config import RunConfig
from lmforge.data.formats import Example
from lmforge.data.loader import load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.inference.engine import stop_token_ids
from lmforge.methods.rewards import build_rewards, scored_batch, weighted_total, write_samples
from lmforge.models.loading import load_tokenizer
from lmforge.training.callbacks import MemoryReport, plot_loss
from lmforge.training.checkpoints import resolve_resume, run_id
from lmforge.training.ppo import Critic, PPOLoop, rollout
from lmforge.training.preference import keep_reference_copy
from lmforge.training.stage import StageResult, begin_stage, load_model_for_training, resolve_template

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """PPO's own combinations, checked before anything is loaded."""
    method, ppo = config.method, config.method.ppo
    if method.name != "ppo":
        raise ValueError(f"methods.ppo cannot run method.name={method.name}")
    if config.train.kernels == "liger" or config.train.compile:
        raise ValueError(
            "ppo's own loop does not use train.kernels: liger or train.compile (they apply to the "
            "Trainer stages); leave them at their defaults (auto, false)"
        )
    if config.train.distributed.strategy != "ddp":
        raise ValueError(
            "ppo's own loop runs on several processes as DDP (a copy of the adapted model on each): "
            "train.distributed.strategy fsdp and deepspeed apply to the Trainer stages; use ddp"
        )
    processes = distributed.world_size()
    if ppo.rollout_batch_size % processes or ppo.mini_batch_size % processes:
        raise ValueError(
            f"ppo.rollout_batch_size ({ppo.rollout_batch_size}) and ppo.mini_batch_size "
            f"({ppo.mini_batch_size}) are split over the {processes} processes: make both multiples of "
            f"{processes}"
        )
    if config.train.optimizer not in ("adamw", "adamw_torch", "adamw_torch_fused"):
        raise ValueError(
            f"ppo's own loop steps policy and critic with AdamW; train.optimizer {config.train.optimizer} "
            "is not available there: use adamw"
        )
    if config.adapter.method in ("none", "moe_dora", "vision_lora"):
        raise ValueError(
            f"ppo trains a peft adapter on a causal LM; adapter.method {config.adapter.method} cannot "
            "(use lora, dora, adalora, ...)"
        )
    samples = ppo.rollout_batch_size * method.sampling.num_generations
    if samples % ppo.mini_batch_size:
        raise ValueError(
            f"ppo.rollout_batch_size x sampling.num_generations = {samples} completions is not a multiple of "
            f"ppo.mini_batch_size = {ppo.mini_batch_size}; change either"
        )
    if samples < 2 and ppo.whiten_advantages:
        raise ValueError("ppo.whiten_advantages needs at least 2 completions per rollout")
    if config.data.packing or config.data.streaming:
        raise ValueError("ppo reads prompts unpacked; turn off data.packing and data.streaming")
    if ppo.critic == "value_head" and ppo.critic_model:
        raise ValueError("ppo.critic_model applies to ppo.critic: separate")


def critic_for(config: RunConfig, model) -> Critic:
    """A value head on the policy's hidden states, or (`ppo.critic: separate`) on its own model."""
    ppo = config.method.ppo
    if ppo.critic == "value_head":
        critic = Critic(model.config.hidden_size)
    else:
        name = ppo.critic_model or config.model.name_or_path
        critic_config = config.model_copy(
            update={
                "model": config.model.model_copy(update={"name_or_path": name}),
                "adapter": config.adapter.model_copy(update={"path": None}),
            }
        )
        trunk, _ = load_model_for_training(critic_config, quiet=True)
        critic = Critic(trunk.config.hidden_size, trunk.eval())
    return critic.to(next(model.parameters()).device)


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    output_dir = begin_stage(config, check)
    method, ppo, train = config.method, config.method.ppo, config.train
    random.seed(train.seed)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    prompts = load_examples(config.data, "prompt").train
    scorer = RewardScorer(config)
    per_epoch = math.ceil(len(prompts) / ppo.rollout_batch_size)
    updates = train.max_steps if train.max_steps > 0 else math.ceil(per_epoch * train.epochs)
    samples = ppo.rollout_batch_size * method.sampling.num_generations
    optimizer_steps = updates * ppo.ppo_epochs * (samples // ppo.mini_batch_size)

    model, _ = load_model_for_training(config, quiet, optimizer_steps)
    if config.adapter.path:
        keep_reference_copy(model)
    model.eval()  # dropout off throughout (see the module docstring)
    run = run_id(config)
    loop = PPOLoop(
        model, critic_for(config, model), ppo, method.sampling.temperature, train, optimizer_steps, run
    )
    if distributed.world_size() > 1:
        torch.manual_seed(train.seed + distributed.rank())  # each process samples its own completions
    main = distributed.is_main()
    resume = distributed.broadcast(resolve_resume(output_dir, train.resume, run) if main else None)
    if resume:
        loop.restore(Path(resume))
        if not quiet:
            console.print(f"[bold]resuming[/] from {resume} (update {loop.state.step})")
    stop_ids = stop_token_ids(tokenizer, template)
    sample = partial(rollout, model, tokenizer, template, sampling=method.sampling, stop_ids=stop_ids)
    # the memory estimate for one update's minibatch of prompt + completion rows
    seq_len = config.data.max_length + method.sampling.max_completion_length
    rows = max(1, ppo.mini_batch_size // train.batch_size)
    memory = MemoryReport(model, train, seq_len, rows, quiet)
    record = loop.train(prompts, updates, sample, scorer, output_dir, not quiet and train.progress, memory)
    artifact = output_dir / "adapter"
    if main:
        plot_loss(output_dir / "metrics.jsonl", output_dir / "loss.png")
        save_artifact(final_adapter(model), tokenizer, template, artifact, "adapter", config)
        # The critic, to inspect or continue from: its value head (and a separate critic's adapter).
        head = {k: v.contiguous() for k, v in loop.critic.head.state_dict().items()}
        save_file(head, str(output_dir / "value_head.safetensors"))
        if loop.critic.trunk is not None:
            loop.critic.trunk.save_pretrained(str(output_dir / "critic"))
    distributed.barrier()
    if not quiet:
        console.print(f"[bold green]saved[/] adapter to {artifact}")
    loss = record.get("loss", math.nan)
    return StageResult(output_dir, artifact, loss, updates, TokenizeStats(examples=len(prompts)), record)


class RewardScorer:
    """Scores a rollout with `method.rewards` (and `ppo.missing_eos_penalty`); writes samples.jsonl
    every `method.samples_every` updates. On several processes each scores its own completions;
    the samples and each source's statistics are those of every process's."""

    def __init__(self, config: RunConfig) -> None:
        self.sources = build_rewards(config.method.rewards)
        self.group = config.method.sampling.num_generations
        self.penalty, self.every = config.method.ppo.missing_eos_penalty, config.method.samples_every
        self.samples = Path(config.train.output_dir) / "samples.jsonl"

    def __call__(self, examples: list[Example], roll: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Each completion's weighted reward (the sequence score), and each source's mean and std."""
        repeated = [e for e in examples for _ in range(self.group)]
        fields: dict[str, list] = {"completion_ids": roll["completion_ids"]}
        for key in {k for e in repeated for k in e.reference} | {"answer"}:
            fields[key] = [e.reference.get(key, e.response if key == "answer" else None) for e in repeated]
        for source in self.sources:
            source.score([e.prompt for e in repeated], roll["texts"], **fields)
        scores = torch.tensor(weighted_total(self.sources))
        if self.penalty is not None:
            scores = scores - self.penalty * (~roll["stopped"]).float().cpu()
        if self.every and step % self.every == 0:
            batches = distributed.gather(scored_batch(self.sources))
            if distributed.is_main():
                write_samples(self.samples, step, batches)
        metrics = {}
        for s in self.sources:
            every = torch.tensor([x for part in distributed.gather(s.last) for x in part])
            metrics[f"rewards/{s.spec.label}/mean"] = float(every.mean())
            metrics[f"rewards/{s.spec.label}/std"] = float(every.std())
        return scores, metrics
