"""Prompts + rewards -> an adapter: GRPO (Shao et al., 2024, DeepSeekMath) through trl's GRPOTrainer.

For every prompt, `sampling.num_generations` completions are sampled with the KV cache on; each is
scored by the weighted sum of `method.rewards` (built-ins, user functions, reward models; see
`methods/rewards.py`); its advantage is its reward minus its group's mean, divided by the group's
std (`grpo.scale_rewards`). The update is PPO's clipped surrogate (`grpo.epsilon`, DAPO's
`epsilon_high`), `grpo.num_iterations` times per batch of completions, aggregated over tokens
as `grpo.loss_type` says.

Where it departs from the paper: `grpo.beta` (the KL penalty) defaults to 0, as DAPO and Dr. GRPO
recommend for verifiable rewards, so no reference model is kept; the default aggregation is
DAPO's token-level mean (the paper's per-sequence mean favours short right answers and long wrong
ones). With beta > 0 the reference is the starting model, as for DPO: base + the SFT adapter
when `adapter.path` continues one, never the bare base.

`train.batch_size` counts completions per device step, as in trl: batch_size x grad_accum
completions (that many / num_generations prompts) are sampled per optimizer step.

Top to bottom: config -> tokenizer and template -> prompts -> rewards -> model + adapter ->
trainer -> train (resuming when asked) -> save the adapter.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from rich.console import Console
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from lmforge import distributed
from lmforge.config import RunConfig
from lmforge.data.formats import Example
from lmforge.data.loader import load_examples
from lmforge.data.tokenize import TokenizeStats
from lmforge.inference.engine import stop_token_ids
from lmforge.methods.rewards import RewardSource, build_rewards, scored_batch, write_samples
from lmforge.models.loading import load_tokenizer
from lmforge.training.preference import MoeAuxLoss, policy_model, prompt_messages, use_template
from lmforge.training.stage import StageResult, begin_stage, optimizer_steps, resolve_template, train_and_save
from lmforge.training.trainer import common_arguments, stage_trainer

console = Console(stderr=True)


class ForgeGRPOTrainer(MoeAuxLoss, GRPOTrainer):
    """trl's GRPOTrainer, plus MoE-DoRA's load-balancing loss when that is the adapter."""


class SamplesCallback(TrainerCallback):
    """Appends the last scored completions to `samples.jsonl` every `every` steps: every
    process's, in rank order, written by the main process."""

    def __init__(self, path: Path, every: int, sources: list[RewardSource]) -> None:
        self.path, self.every, self.sources = path, every, sources

    def on_step_end(self, args, state, control, **kwargs):
        if not (self.every and state.global_step % self.every == 0):
            return
        batches = distributed.gather(scored_batch(self.sources))  # collective: every process calls it
        if distributed.is_main() and any(batch["prompts"] for batch in batches):
            write_samples(self.path, state.global_step, batches)


def check(config: RunConfig) -> None:
    """GRPO's own combinations, checked before anything is loaded."""
    method, train = config.method, config.train
    if method.name != "grpo":
        raise ValueError(f"methods.grpo cannot run method.name={method.name}")
    if config.adapter.method == "none":
        raise ValueError("grpo trains an adapter (no full fine-tuning in post-training): set adapter.method")
    completions = train.batch_size * train.grad_accum
    if completions % method.sampling.num_generations:
        raise ValueError(
            f"train.batch_size x train.grad_accum = {completions} completions per step is not a multiple of "
            f"method.sampling.num_generations = {method.sampling.num_generations} (each prompt's group must "
            "fit in one step); change either"
        )
    if method.sampling.num_generations < 2:
        raise ValueError("grpo compares completions within a group: method.sampling.num_generations >= 2")
    if config.adapter.method == "moe_dora" and method.grpo.beta > 0:
        raise ValueError(
            "grpo with beta > 0 needs a reference model, and trl cannot switch MoE-DoRA (lmforge's own "
            "adapter) off to get one; set method.grpo.beta: 0"
        )
    if method.sampling.use_vllm and config.model.device == "cpu":
        raise ValueError("method.sampling.use_vllm needs a CUDA GPU; turn it off on CPU")
    if config.data.packing or config.data.streaming:
        raise ValueError("grpo reads prompts unpacked; turn off data.packing and data.streaming")


def prompt_dataset(examples: list[Example]) -> Dataset:
    """Conversational prompts plus each record's reference fields (`answer`: its response if any)."""
    rows = []
    for example in examples:
        fields = dict(example.reference)
        if example.response and "answer" not in fields:
            fields["answer"] = example.response
        rows.append({"prompt": prompt_messages(example), **fields})
    return Dataset.from_list(rows)


def grpo_arguments(config: RunConfig, hardware, has_eval: bool, weights: list[float]) -> GRPOConfig:
    sampling, grpo = config.method.sampling, config.method.grpo
    return GRPOConfig(
        **common_arguments(config.train, hardware, has_eval),
        num_generations=sampling.num_generations,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_completion_length=sampling.max_completion_length,
        use_vllm=sampling.use_vllm,
        beta=grpo.beta,
        loss_type=grpo.loss_type,
        num_iterations=grpo.num_iterations,
        epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high,
        scale_rewards=grpo.scale_rewards,
        mask_truncated_completions=grpo.mask_truncated_completions,
        reward_weights=weights,
        cache_implementation=None,  # the dynamic KV cache, and on even though training turned it off:
        generation_kwargs=None if sampling.use_vllm else {"use_cache": True},
        log_completions=False,  # lmforge writes samples.jsonl instead
    )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    output_dir = begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    use_template(tokenizer, template)
    data = load_examples(config.data, "prompt")
    train_ds = prompt_dataset(data.train)
    eval_ds = prompt_dataset(data.eval) if data.eval else None
    sources = build_rewards(config.method.rewards)
    if not quiet:
        names = ", ".join(f"{s.spec.label} x{s.spec.weight:g}" for s in sources)
        console.print(f"[bold]prompts[/]: {len(train_ds)} train; [bold]rewards[/]: {names}")

    group = config.method.sampling.num_generations
    model, hardware, peft = policy_model(config, quiet, optimizer_steps(config, len(train_ds) * group))
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, template)  # trl stops and masks there
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer = stage_trainer(
        ForgeGRPOTrainer,
        config,
        model,
        "grpo",
        quiet,
        [SamplesCallback(output_dir / "samples.jsonl", config.method.samples_every, sources)],
        reward_funcs=sources,
        args=grpo_arguments(config, hardware, eval_ds is not None, [s.spec.weight for s in sources]),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft,
    )
    stats = TokenizeStats(examples=len(train_ds))
    return train_and_save(trainer, config, tokenizer, template, stats, evaluate=False, quiet=quiet)
