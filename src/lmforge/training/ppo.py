"""PPO's loop machinery: the critic, rollouts, one update, and a resumable loop state.

`methods/ppo.py` is the driver (what one update does, step by step, is in its docstring); the
math is in `losses/ppo.py`, tested on hand-computed values. `PPOLoop` owns what a checkpoint must
restore: the policy's and critic's trainable weights, one AdamW over both, its scheduler, the KL
controller, the prompt order and the RNGs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers import PreTrainedTokenizerBase, get_scheduler

from lmforge import distributed
from lmforge.config.rl import PpoOptions, SamplingOptions
from lmforge.config.train import TrainConfig
from lmforge.data.formats import Example
from lmforge.data.templates import AnyTemplate
from lmforge.losses import ppo as losses
from lmforge.training.callbacks import MemoryReport, append_record, last_time
from lmforge.training.checkpoints import load_loop_checkpoint, save_loop_checkpoint
from lmforge.training.preference import reference
from lmforge.training.trainer import schedule_arguments

console = Console(stderr=True)


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
        if getattr(critic, "module", critic).trunk is None:  # (DDP wraps the critic as .module)
            values = critic(hidden=out.hidden_states[-1][:, prompt_len - 1 : -1])
        else:
            values = critic(input_ids=ids, attention_mask=attention, position_ids=positions)[
                :, prompt_len - 1 : -1
            ]
    return logprobs, entropy, values


def rollout(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    examples: list[Example],
    sampling: SamplingOptions,
    stop_ids: list[int],
) -> dict:
    """Sample completions for `examples` (left-padded prompts; KV cache on)."""
    texts = [template.generation_prompt(e.conversation(""), tokenizer) for e in examples]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
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
    kept = [row[m] for row, m in zip(completion, mask, strict=True)]  # each completion's own tokens
    return {
        "ids": torch.cat([generated[:, :prompt_len], completion], 1),
        "attention": torch.cat([prompt_mask, mask.long()], 1),
        "mask": mask,
        "stopped": stopped,
        "prompt_len": prompt_len,
        "tokens": int(mask.sum()),  # completion tokens, stop tokens included
        "completion_ids": [row.tolist() for row in kept],
        "texts": tokenizer.batch_decode(kept, skip_special_tokens=True),
    }


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint must restore (with the weights, optimizer and RNGs)."""

    step: int = 0
    optimizer_step: int = 0
    order: list[int] = field(default_factory=list)  # prompts not yet drawn this epoch


class PPOLoop:
    """Policy + critic, one AdamW over both's trainable weights with the configured schedule over
    `optimizer_steps`, the KL controller and the loop state; `step` runs one update.

    On several processes (docs/distributed.md) each rolls out its share of the prompts, policy and
    critic are wrapped for DDP by accelerate (gradients averaged over the processes), advantages
    are whitened and statistics averaged over the whole rollout, and the main process logs and
    writes checkpoints (each process adds its random state)."""

    def __init__(
        self,
        model,
        critic: Critic,
        ppo: PpoOptions,
        temperature: float,
        train: TrainConfig,
        optimizer_steps: int,
        run: str | None = None,
    ) -> None:
        self.model, self.critic, self.ppo, self.temperature, self.train_config = (
            model,
            critic,
            ppo,
            temperature,
            train,
        )
        params = [p for module in (model, critic) for p in module.parameters() if p.requires_grad]
        options = train.optimizer_options
        self.optimizer = torch.optim.AdamW(
            params, lr=train.lr, weight_decay=train.weight_decay, betas=options.betas, eps=options.eps
        )
        schedule = schedule_arguments(train)
        self.scheduler = get_scheduler(
            schedule["lr_scheduler_type"],
            self.optimizer,
            train.warmup_steps or math.ceil(train.warmup_ratio * optimizer_steps),
            optimizer_steps,
            scheduler_specific_kwargs=schedule.get("lr_scheduler_kwargs"),
        )
        self.kl_ctl = (
            losses.AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
            if ppo.kl_target
            else losses.FixedKLController(ppo.kl_coef)
        )
        self.state = LoopState()
        self.run = run  # the run id its checkpoints are marked with (training/checkpoints.run_id)
        # What forward and backward go through: DDP wrappers on several processes.
        self.policy = distributed.wrap_for_processes(model)
        self.critic_net = distributed.wrap_for_processes(critic)

    def next_prompts(self, prompts: list[Example], count: int) -> list[Example]:
        """This process's share of the next `count` prompts of a shuffled pass (fewer at the end of
        one): every process draws the same prompts (the same seed) and keeps its own slice."""
        if not self.state.order:
            self.state.order = random.sample(range(len(prompts)), len(prompts))
        drawn = [prompts[self.state.order.pop()] for _ in range(min(count, len(self.state.order)))]
        share = math.ceil(len(drawn) / distributed.world_size())
        return drawn[distributed.rank() * share : (distributed.rank() + 1) * share]

    def step(self, roll: dict, scores: torch.Tensor) -> dict:
        """One update from a scored rollout: advantages, ppo_epochs of clipped updates, the KL
        controller; returns the step's metrics."""
        started = time.perf_counter()
        stats = update(self, roll, scores)
        self.state.optimizer_step += stats.pop("optimizer_steps")
        if hasattr(getattr(self.model, "base_model", None), "update_and_allocate"):  # AdaLoRA's rank budget
            self.model.base_model.update_and_allocate(self.state.optimizer_step)
        every = torch.cat(distributed.gather(scores.float().cpu()))  # the whole rollout's scores
        stopped = distributed.sum_over_processes(roll["stopped"].float().sum().cpu())
        tokens = distributed.sum_over_processes(torch.tensor(float(roll["tokens"])))
        record = {
            **stats,
            "reward": float(every.mean()),
            "reward_std": float(every.std()) if len(every) > 1 else 0.0,
            "completions/mean_length": float(tokens) / len(every),
            "completions/stopped": float(stopped) / len(every),
            "kl_coef": self.kl_ctl.value,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "time/optimization": time.perf_counter() - started,
        }
        self.kl_ctl.update(stats["kl"], len(every))
        return record

    def train(
        self,
        prompts: list[Example],
        updates: int,
        sample: Callable[[list[Example]], dict],
        score: Callable[[list[Example], dict, int], tuple[torch.Tensor, dict]],
        output_dir: Path,
        show_progress: bool,
        memory: MemoryReport | None = None,
    ) -> dict:
        """Updates until `updates`: `sample` a rollout of the next prompts, `score` it (the scores
        and their metrics), update; metrics.jsonl (and TensorBoard under output_dir/runs with
        train.tensorboard) every logging_steps, a checkpoint every save_steps, the `memory` report
        at the start and end, as the Trainer's stages have; returns the last update's metrics."""
        train, record = self.train_config, {}
        started = time.time() - last_time(output_dir / "metrics.jsonl")  # a resumed run's clock goes on
        device = next(self.model.parameters()).device
        main = distributed.is_main()  # the one process that logs and shows progress
        board = tensorboard_writer(output_dir) if train.tensorboard and main else None
        if memory is not None:
            memory.start(device, main)
        progress = Progress(
            TextColumn("[bold]ppo"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} updates"),
            TextColumn("reward {task.fields[reward]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not (show_progress and main),
            console=console,
        )
        with progress:
            task = progress.add_task("ppo", total=updates, completed=self.state.step, reward="-")
            while self.state.step < updates:
                self.state.step += 1
                step = self.state.step
                examples = self.next_prompts(prompts, self.ppo.rollout_batch_size)
                t0 = time.perf_counter()
                roll = sample(examples)
                t1 = time.perf_counter()
                scores, reward_metrics = score(examples, roll, step)
                t2 = time.perf_counter()
                tokens = distributed.sum_over_processes(torch.tensor(float(roll["tokens"])))
                record = {
                    "step": step,
                    "time": round(time.time() - started, 3),
                    **self.step(roll, scores),
                    **reward_metrics,
                    "time/generation": t1 - t0,
                    "time/scoring": t2 - t1,
                    "rollout_tokens_per_s": float(tokens) / (t1 - t0),
                }
                if main and (step % train.logging_steps == 0 or step in (1, updates)):
                    append_record(output_dir / "metrics.jsonl", record)
                    for key, value in record.items():
                        if board is not None and key not in ("step", "time"):
                            board.add_scalar(f"train/{key}", value, step)
                if train.save_steps and step % train.save_steps == 0 and step < updates:
                    self.save(output_dir, train.save_total_limit)
                progress.update(task, advance=1, reward=f"{record['reward']:.3f}")
        if board is not None:
            board.close()
        if memory is not None:
            memory.end(device, self.state.step, None, main, self.optimizer)
        return record

    def save(self, output_dir: Path, limit: int) -> None:
        state = {**asdict(self.state), "kl_coef": self.kl_ctl.value}
        weights = {"policy": trainable_state(self.model), "critic": trainable_state(self.critic)}
        save_loop_checkpoint(
            output_dir, self.state.step, weights, self.optimizer, self.scheduler, state, limit, self.run
        )

    def restore(self, checkpoint: Path) -> None:
        modules = {"policy": self.model, "critic": self.critic}
        state = load_loop_checkpoint(checkpoint, modules, self.optimizer, self.scheduler)
        self.kl_ctl.value = state.pop("kl_coef")
        self.state = LoopState(**state)


def tensorboard_writer(output_dir: Path):
    """A TensorBoard writer under output_dir/runs/ (one folder per start, as the Trainer's)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output_dir / "runs" / time.strftime("%b%d_%H-%M-%S")))


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def update(loop: PPOLoop, roll: dict, scores: torch.Tensor) -> dict:
    """Advantages from one rollout, then ppo_epochs of clipped updates; returns the step's stats."""
    model, ppo, temperature = loop.model, loop.ppo, loop.temperature
    policy, critic = loop.policy, loop.critic_net  # DDP wrappers on several processes
    ids, attention, mask, prompt_len = roll["ids"], roll["attention"], roll["mask"], roll["prompt_len"]
    device = ids.device
    micro = loop.train_config.batch_size

    def run(idx, with_values: bool = True):
        return forward(policy, critic, ids[idx], attention[idx], prompt_len, temperature, with_values)

    with torch.no_grad():
        old_logprobs, old_values, ref_logprobs = [], [], []
        for i in range(0, len(ids), micro):
            part = slice(i, i + micro)
            lp, _, v = run(part)
            old_logprobs.append(lp)
            old_values.append(v)
            with reference(model):
                ref_logprobs.append(run(part, with_values=False)[0])
        old_logprobs, old_values, ref_logprobs = (
            torch.cat(x) for x in (old_logprobs, old_values, ref_logprobs)
        )
        rewards, kl = losses.per_token_rewards(
            scores.to(device), old_logprobs, ref_logprobs, mask, loop.kl_ctl.value, ppo.kl_estimator
        )
        advantages, returns = losses.gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten_over_processes(advantages, mask)
    params = loop.optimizer.param_groups[0]["params"]
    totals: dict[str, list[float]] = {}
    steps = 0
    mini_batch = ppo.mini_batch_size // distributed.world_size()  # this process's share of one
    for _ in range(ppo.ppo_epochs):
        permutation = torch.randperm(len(ids))
        for start in range(0, len(ids), mini_batch):
            chosen = permutation[start : start + mini_batch]
            loop.optimizer.zero_grad()
            for j in range(0, len(chosen), micro):
                idx = chosen[j : j + micro].to(device)
                lp, entropy, values = run(idx)
                m = mask[idx]
                pg, pg_stats = losses.policy_loss(lp, old_logprobs[idx], advantages[idx], m, ppo.clip_range)
                vf, vf_stats = losses.value_loss(
                    values, old_values[idx], returns[idx], m, ppo.clip_range_value
                )
                ent = losses.masked_mean(entropy, m)
                loss = pg + ppo.vf_coef * vf - ppo.entropy_coef * ent
                (loss * len(idx) / len(chosen)).backward()
                parts = {
                    "loss": loss,
                    "policy_loss": pg,
                    "value_loss": vf,
                    "entropy": ent,
                    **pg_stats,
                    **vf_stats,
                }
                for key, value in parts.items():
                    totals.setdefault(key, []).append(float(value.detach()))
            if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                raise RuntimeError(
                    f"ppo: a non-finite gradient at optimizer step {steps + 1}; lower train.lr"
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(params, loop.train_config.max_grad_norm)
            totals.setdefault("grad_norm", []).append(float(grad_norm))
            loop.optimizer.step()
            loop.scheduler.step()
            steps += 1
    stats = {key: sum(values) / len(values) for key, values in totals.items()}
    stats.update(
        kl=float((kl * mask).sum(-1).mean()),
        explained_variance=float(losses.explained_variance(old_values, returns, mask)),
    )
    return {**distributed.mean_over_processes(stats), "optimizer_steps": steps}


def whiten_over_processes(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`losses.masked_whiten` over the whole rollout, every process's share of it: the mean and
    the unbiased variance from sums over the processes (in one process, masked_whiten's own)."""
    mask = mask.bool()
    kept = torch.where(mask, x, torch.zeros_like(x))
    sums = distributed.sum_over_processes(torch.stack([kept.sum(), mask.sum().to(x.dtype)]))
    mean, n = sums[0] / sums[1], int(sums[1])
    if n < 2:
        raise ValueError(f"whitening needs at least 2 unmasked elements, got {n}")
    centered = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x))
    var = distributed.sum_over_processes(centered.sum()) / n * n / (n - 1)  # as losses.masked_var
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))
