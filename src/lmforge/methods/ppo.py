"""Prompts + rewards -> an adapter: PPO for RLHF (Ziegler et al., 2019; Ouyang et al., 2022), our own loop.

trl has no stable PPO. This driver follows "The N implementation details of RLHF with PPO"
(Huang et al., 2024); the math is in `losses/ppo.py`, tested on hand-computed values. One update:

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

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_scheduler

from lmforge.artifacts import save_artifact, write_resolved_config
from lmforge.config import RunConfig
from lmforge.data.loader import load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.inference.engine import stop_token_ids
from lmforge.losses import ppo as losses
from lmforge.methods.rewards import build_rewards, weighted_total, write_samples
from lmforge.models.loading import load_tokenizer
from lmforge.training.callbacks import mark_complete, plot_loss
from lmforge.training.checkpoints import complete_checkpoints, resolve_resume
from lmforge.training.preference import final_adapter, keep_reference_copy, reference
from lmforge.training.stage import StageResult, load_model_for_training, resolve_template
from lmforge.training.trainer import schedule_arguments

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """PPO's own combinations, checked before anything is loaded."""
    method, ppo = config.method, config.method.ppo
    if method.name != "ppo":
        raise ValueError(f"methods.ppo cannot run method.name={method.name}")
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
    if config.adapter.method == "adalora" and config.adapter.path:
        raise ValueError(
            "ppo cannot continue an AdaLoRA adapter (its frozen reference copy would be a second AdaLoRA "
            "adapter, which peft refuses): merge it first (lmforge merge) and train a new adapter"
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


class Critic(nn.Module):
    """Values per position: a scalar head on hidden states (the policy's, or its own model's)."""

    def __init__(self, hidden_size: int, trunk: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = trunk  # None: the policy's hidden states are passed in
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)  # values start at 0: no early advantage noise
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        if self.trunk is not None:
            hidden = self.trunk(**inputs, output_hidden_states=True).hidden_states[-1]
        assert hidden is not None
        return self.head(hidden.float()).squeeze(-1)


def response_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of each completion's tokens up to and including its first stop token, stopped or not)."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    stopped = is_stop.any(-1)
    first = torch.where(stopped, is_stop.int().argmax(-1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return positions[None, :] <= first[:, None], stopped


def forward(model, critic: Critic, ids, attention, prompt_len: int, temperature: float, with_values: bool):
    """Response-token log-probs, entropies and values (B x T) of sequences = prompt + completion."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, output_hidden_states=True)
    logits = out.logits[:, prompt_len - 1 : -1].float() / temperature
    targets = ids[:, prompt_len:]
    logprobs = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = losses.entropy_from_logits(logits)
    values = None
    if with_values:
        if critic.trunk is None:
            values = critic(hidden=out.hidden_states[-1][:, prompt_len - 1 : -1])
        else:
            values = critic(input_ids=ids, attention_mask=attention, position_ids=positions)[
                :, prompt_len - 1 : -1
            ]
    return logprobs, entropy, values


def rollout(model, tokenizer, template, examples, config: RunConfig, stop_ids: list[int]) -> dict:
    """Sample completions for `examples` (left-padded prompts; KV cache on)."""
    sampling = config.method.sampling
    texts = [template.generation_prompt(e.conversation(""), tokenizer) for e in examples]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        generated = model.generate(
            **batch,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            max_new_tokens=sampling.max_completion_length,
            num_return_sequences=sampling.num_generations,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    prompt_len = batch["input_ids"].shape[1]
    completion = generated[:, prompt_len:]
    mask, stopped = response_mask(completion, stop_ids)
    completion = torch.where(mask, completion, tokenizer.pad_token_id)
    prompt_mask = batch["attention_mask"].repeat_interleave(sampling.num_generations, 0)
    return {
        "ids": torch.cat([generated[:, :prompt_len], completion], 1),
        "attention": torch.cat([prompt_mask, mask.long()], 1),
        "mask": mask,
        "stopped": stopped,
        "prompt_len": prompt_len,
        "texts": tokenizer.batch_decode(
            [row[m] for row, m in zip(completion, mask, strict=True)], skip_special_tokens=True
        ),
    }


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    check(config)
    method, ppo, train = config.method, config.method.ppo, config.train
    output_dir = Path(config.train.output_dir)
    write_resolved_config(config, output_dir)
    random.seed(train.seed)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    prompts = load_examples(config.data, "prompt").train
    sources = build_rewards(method.rewards)
    per_epoch = math.ceil(len(prompts) / ppo.rollout_batch_size)
    updates = train.max_steps if train.max_steps > 0 else math.ceil(per_epoch * train.epochs)
    samples = ppo.rollout_batch_size * method.sampling.num_generations
    optimizer_steps = updates * ppo.ppo_epochs * (samples // ppo.mini_batch_size)

    model, hardware = load_model_for_training(config, quiet, optimizer_steps)
    if config.adapter.path:
        keep_reference_copy(model)
    model.eval()  # dropout off throughout (see the module docstring)
    stop_ids = stop_token_ids(tokenizer, template)
    hidden = model.config.hidden_size
    if ppo.critic == "value_head":
        critic = Critic(hidden)
    else:
        critic_config = config.model_copy(
            update={
                "model": config.model.model_copy(
                    update={"name_or_path": ppo.critic_model or config.model.name_or_path}
                ),
                "adapter": config.adapter.model_copy(update={"path": None}),
            }
        )
        trunk, _ = load_model_for_training(critic_config, quiet=True)
        critic = Critic(trunk.config.hidden_size, trunk.eval())
    critic.to(next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad] + [
        p for p in critic.parameters() if p.requires_grad
    ]
    betas, eps = train.optimizer_options.betas, train.optimizer_options.eps
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=betas, eps=eps)
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * optimizer_steps)
    schedule = schedule_arguments(train)
    scheduler = get_scheduler(
        schedule["lr_scheduler_type"],
        optimizer,
        warmup,
        optimizer_steps,
        scheduler_specific_kwargs=schedule.get("lr_scheduler_kwargs"),
    )
    kl_ctl = (
        losses.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        if ppo.kl_target
        else losses.FixedKLController(ppo.kl_coef)
    )
    metrics_path = output_dir / "metrics.jsonl"
    loop, record = LoopState(), {}
    resume = resolve_resume(output_dir, train.resume)
    if resume:
        loop = load_checkpoint(Path(resume), model, critic, optimizer, scheduler, kl_ctl)
        if not quiet:
            console.print(f"[bold]resuming[/] from {resume} (update {loop.step})")
    started = time.time()
    progress = Progress(
        TextColumn("[bold]ppo"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} updates"),
        TextColumn("reward {task.fields[reward]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=quiet or not train.progress,
        console=console,
    )
    with progress:
        task = progress.add_task("ppo", total=updates, completed=loop.step, reward="-")
        while loop.step < updates:
            loop.step += 1
            step = loop.step
            if not loop.order:
                loop.order = random.sample(range(len(prompts)), len(prompts))
            batch_examples = [
                prompts[loop.order.pop()] for _ in range(min(ppo.rollout_batch_size, len(loop.order)))
            ]
            t0 = time.perf_counter()
            roll = rollout(model, tokenizer, template, batch_examples, config, stop_ids)
            t1 = time.perf_counter()
            scores = score(
                sources, batch_examples, roll, method.sampling.num_generations, ppo.missing_eos_penalty
            )
            t2 = time.perf_counter()
            stats = update(model, critic, optimizer, scheduler, kl_ctl, roll, scores, config)
            loop.optimizer_step += stats.pop("optimizer_steps")
            if config.adapter.method == "adalora":
                model.base_model.update_and_allocate(loop.optimizer_step)
            t3 = time.perf_counter()
            tokens = int(roll["mask"].sum())
            record = {
                "step": step,
                "time": round(time.time() - started, 3),
                **stats,
                "reward": float(scores.mean()),
                "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                **{f"rewards/{s.spec.label}/mean": sum(s.last) / len(s.last) for s in sources},
                **{f"rewards/{s.spec.label}/std": float(torch.tensor(s.last).std()) for s in sources},
                "completions/mean_length": tokens / len(scores),
                "completions/stopped": float(roll["stopped"].float().mean()),
                "kl_coef": kl_ctl.value,
                "learning_rate": scheduler.get_last_lr()[0],
                "time/generation": t1 - t0,
                "time/scoring": t2 - t1,
                "time/optimization": t3 - t2,
                "rollout_tokens_per_s": tokens / (t1 - t0),
            }
            if step % train.logging_steps == 0 or step in (1, updates):
                with metrics_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
            if method.samples_every and step % method.samples_every == 0:
                write_samples(output_dir / "samples.jsonl", step, sources)
            kl_ctl.update(stats["kl"], len(scores))
            if train.save_steps and step % train.save_steps == 0 and step < updates:
                save_checkpoint(
                    output_dir, loop, model, critic, optimizer, scheduler, kl_ctl, train.save_total_limit
                )
            progress.update(task, advance=1, reward=f"{record['reward']:.3f}")
    plot_loss(metrics_path, output_dir / "loss.png")

    artifact = save_artifact(
        final_adapter(model), tokenizer, template, output_dir / "adapter", "adapter", config
    )
    # The critic, to inspect or continue from: its value head (and a separate critic's adapter).
    save_file(
        {k: v.contiguous() for k, v in critic.head.state_dict().items()},
        str(output_dir / "value_head.safetensors"),
    )
    if critic.trunk is not None:
        critic.trunk.save_pretrained(str(output_dir / "critic"))
    if not quiet:
        console.print(f"[bold green]saved[/] adapter to {artifact}")
    loss = record.get("loss", math.nan)
    return StageResult(output_dir, artifact, loss, updates, TokenizeStats(examples=len(prompts)), record)


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint must restore (with the weights, optimizer and RNGs)."""

    step: int = 0
    optimizer_step: int = 0
    order: list[int] = field(default_factory=list)  # prompts not yet drawn this epoch


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, loop: LoopState, model, critic, optimizer, scheduler, kl_ctl, limit):
    """checkpoint-N/: trainable weights, optimizer, scheduler, loop state and RNGs; marked complete last."""
    final = output_dir / f"checkpoint-{loop.step}"
    tmp = output_dir / f".checkpoint-{loop.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "policy.safetensors"))
    save_file(trainable_state(critic), str(tmp / "critic.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    state = {**asdict(loop), "kl_coef": kl_ctl.value, "python_rng": random.getstate()}
    (tmp / "loop.json").write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    mark_complete(final, loop.step)
    if limit:
        for old in complete_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)


def load_checkpoint(path: Path, model, critic, optimizer, scheduler, kl_ctl) -> LoopState:
    for module, name in ((model, "policy"), (critic, "critic")):
        weights = load_file(str(path / f"{name}.safetensors"))
        params = dict(module.named_parameters())
        for key, value in weights.items():
            params[key].data.copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    state = json.loads((path / "loop.json").read_text(encoding="utf-8"))
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    kl_ctl.value = state.pop("kl_coef")
    return LoopState(**state)


def score(sources, examples, roll: dict, group: int, missing_eos_penalty: float | None) -> torch.Tensor:
    """Each completion's weighted reward (the sequence score), checked source by source."""
    repeated = [e for e in examples for _ in range(group)]
    prompts = [e.prompt for e in repeated]
    fields: dict[str, list] = {}
    for key in {k for e in repeated for k in e.reference} | {"answer"}:
        fields[key] = [e.reference.get(key, e.response if key == "answer" else None) for e in repeated]
    mask = roll["mask"]
    fields["completion_ids"] = [
        row[m].tolist() for row, m in zip(roll["ids"][:, roll["prompt_len"] :], mask, strict=True)
    ]
    for source in sources:
        source.score(prompts, roll["texts"], **fields)
    scores = torch.tensor(weighted_total(sources))
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~roll["stopped"]).float().cpu()
    return scores


def update(
    model, critic, optimizer, scheduler, kl_ctl, roll: dict, scores: torch.Tensor, config: RunConfig
) -> dict:
    """Advantages from one rollout, then ppo_epochs of clipped updates; returns the step's stats."""
    ppo, temperature = config.method.ppo, config.method.sampling.temperature
    ids, attention, mask, prompt_len = roll["ids"], roll["attention"], roll["mask"], roll["prompt_len"]
    device = ids.device
    micro = config.train.batch_size
    with torch.no_grad():
        old_logprobs, old_values, ref_logprobs = [], [], []
        for i in range(0, len(ids), micro):
            lp, _, v = forward(
                model, critic, ids[i : i + micro], attention[i : i + micro], prompt_len, temperature, True
            )
            old_logprobs.append(lp)
            old_values.append(v)
            with reference(model):
                ref_lp, _, _ = forward(
                    model,
                    critic,
                    ids[i : i + micro],
                    attention[i : i + micro],
                    prompt_len,
                    temperature,
                    False,
                )
            ref_logprobs.append(ref_lp)
        old_logprobs, old_values, ref_logprobs = (
            torch.cat(x) for x in (old_logprobs, old_values, ref_logprobs)
        )
        rewards, kl = losses.per_token_rewards(
            scores.to(device), old_logprobs, ref_logprobs, mask, kl_ctl.value, ppo.kl_estimator
        )
        advantages, returns = losses.gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask)
    n, mini = len(ids), ppo.mini_batch_size
    totals: dict[str, list[float]] = {}
    steps = 0
    for _ in range(ppo.ppo_epochs):
        permutation = torch.randperm(n)
        for start in range(0, n, mini):
            chosen = permutation[start : start + mini]
            optimizer.zero_grad()
            for j in range(0, len(chosen), micro):
                idx = chosen[j : j + micro].to(device)
                lp, entropy, values = forward(
                    model, critic, ids[idx], attention[idx], prompt_len, temperature, True
                )
                m = mask[idx]
                pg, pg_stats = losses.policy_loss(lp, old_logprobs[idx], advantages[idx], m, ppo.clip_range)
                vf, vf_stats = losses.value_loss(
                    values, old_values[idx], returns[idx], m, ppo.clip_range_value
                )
                ent = losses.masked_mean(entropy, m)
                loss = pg + ppo.vf_coef * vf - ppo.entropy_coef * ent
                (loss * len(idx) / len(chosen)).backward()
                for key, value in {
                    "loss": loss,
                    "policy_loss": pg,
                    "value_loss": vf,
                    "entropy": ent,
                    **pg_stats,
                    **vf_stats,
                }.items():
                    totals.setdefault(key, []).append(float(value.detach()))
            if not all(
                torch.isfinite(p.grad).all()
                for p in optimizer.param_groups[0]["params"]
                if p.grad is not None
            ):
                raise RuntimeError(
                    f"ppo: a non-finite gradient at optimizer step {steps + 1}; lower train.lr"
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(
                optimizer.param_groups[0]["params"], config.train.max_grad_norm
            )
            totals.setdefault("grad_norm", []).append(float(grad_norm))
            optimizer.step()
            scheduler.step()
            steps += 1
    stats = {key: sum(values) / len(values) for key, values in totals.items()}
    sequence_kl = (kl * mask).sum(-1)
    stats.update(
        kl=float(sequence_kl.mean()),
        explained_variance=float(losses.explained_variance(old_values, returns, mask)),
        optimizer_steps=steps,
    )
    return stats
