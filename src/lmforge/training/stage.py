"""What every stage driver shares: the template choice, the model loader, the tail (resume,
train, evaluate, save) and the result it returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lmforge import distributed
from lmforge.adapters.build import attach_adapter, final_adapter
from lmforge.artifacts import save_artifact, write_resolved_config
from lmforge.config import RunConfig
from lmforge.config.optim import CUDA_ONLY
from lmforge.data.templates import AnyTemplate, pick_template
from lmforge.data.tokenize import TokenizeStats
from lmforge.models.hardware import Hardware, choose_hardware
from lmforge.models.loading import (
    check_full_finetune,
    count_parameters,
    load_causal_lm,
    load_classifier,
    load_masked_lm,
    load_seq2seq_lm,
    saved_template_name,
)
from lmforge.training.checkpoints import resolve_resume, run_id, start_run

console = Console(stderr=True)


@dataclass
class StageResult:
    output_dir: Path
    artifact: Path
    train_loss: float
    steps: int
    stats: TokenizeStats
    metrics: dict[str, float] = field(default_factory=dict)


def begin_stage(config: RunConfig, check: Callable[[RunConfig], None]) -> Path:
    """The head every driver shares, before anything loads: the stage's own `check`, then
    `check_stage`, then where the run starts (`training.checkpoints.start_run`: resume, start over,
    or refuse a folder holding another run); the resolved config is written to output_dir, which
    is returned."""
    check(config)
    check_stage(config)
    output_dir = Path(config.train.output_dir)
    if distributed.is_main():  # the others wait: they read what it writes
        start_run(config)
        write_resolved_config(config, output_dir)
    distributed.barrier()
    return output_dir


def check_stage(config: RunConfig) -> None:
    """What every stage checks that the config schema cannot: combinations that depend on the
    machine or the checkpoint (the device the model will load on; a base stored quantized cannot be
    fully fine-tuned)."""
    check_full_finetune(config.model, config.adapter.method)
    if config.model.quantization == "8bit" and config.train.distributed.shards_parameters:
        raise ValueError(
            "model.quantization 8bit cannot be sharded (bitsandbytes' int8 weights keep their scales "
            "beside them): with train.distributed.strategy fsdp or deepspeed zero_stage 3 use "
            "quantization 4bit (QLoRA, stored in the compute dtype so it shards), or strategy ddp"
        )
    if config.train.optimizer in CUDA_ONLY and choose_hardware(config.model).device != "cuda":
        raise ValueError(
            f"train.optimizer {config.train.optimizer} keeps bitsandbytes' 8-bit/paged states on a CUDA GPU "
            "and none is in use; use train.optimizer: adamw"
        )


def resolve_template(config: RunConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> AnyTemplate:
    """data.template; `auto` resolves as every command does (`data.templates.pick_template`)."""
    return template_for(config.data.template, config.model.name_or_path, tokenizer)


def template_for(
    name: str, model_name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> AnyTemplate:
    """The template `name`; `auto` resolves as every command does (`data.templates.pick_template`)."""
    return pick_template(name, [saved_template_name(model_name_or_path)], tokenizer, model_name_or_path)


# What each task loads, and the peft task its adapter is attached with.
TASKS = {
    "causal": "CAUSAL_LM",
    "reward": "SEQ_CLS",  # one output: the reward model's backbone + a scalar head
    "classify": "SEQ_CLS",  # one output per class (`labels`)
    "mlm": None,  # a masked LM: peft has no task type for it
    "seq2seq": "SEQ_2_SEQ_LM",
}


def load_model_for_training(
    config: RunConfig,
    quiet: bool = False,
    total_steps: int | None = None,
    task: str = "causal",
    tokenizer: PreTrainedTokenizerBase | None = None,
    labels: list[str] | None = None,
) -> tuple[PreTrainedModel, Hardware]:
    """Seeded model load plus the configured adapter; prints trainable / total parameters.

    `task` (a key of TASKS) picks the model class: a causal LM, a one-output reward classifier, a
    classifier over `labels`, a masked LM or an encoder-decoder. `total_steps` (the optimizer
    steps the run will take) is needed by AdaLoRA's rank schedule. With `model.arch` the causal LM
    is built new from the lab architecture (its `tokenizer` given). A sequence classifier's head
    reads the last non-pad token, so it is told the `tokenizer`'s pad id when one is given.
    """
    set_seed(config.train.seed)  # adapter (and head) initialisation must be reproducible too
    model, hardware = _load(config, task, quiet, tokenizer, labels)
    if TASKS[task] == "SEQ_CLS" and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.adapter.method != "none":
        model = attach_adapter(
            model,
            config.adapter,
            config.train.gradient_checkpointing,
            total_steps,
            pissa_init_dir(config),
            task_type=TASKS[task],
        )
    trainable, total = count_parameters(model)
    if not quiet:
        share = 100 * trainable / max(total, 1)
        console.print(f"[bold]parameters[/]: {trainable:,} trainable / {total:,} total ({share:.3f}%)")
    return model, hardware


def _load(config: RunConfig, task: str, quiet: bool, tokenizer, labels) -> tuple[PreTrainedModel, Hardware]:
    if task == "causal" and config.model.arch:
        from lmforge.lab.build import new_model

        assert tokenizer is not None, "model.arch needs the architecture's tokenizer"
        hardware = choose_hardware(config.model)
        if not quiet:
            console.print(f"[bold]hardware[/]: {hardware.describe()}")
        model = new_model(config.model.arch, tokenizer, hardware.attn_implementation)
        model = model.to(distributed.device_for(hardware.device))
        model.config.use_cache = False
        return model, hardware
    if task in ("causal", "reward"):
        sharded = config.train.distributed.shards_parameters
        return load_causal_lm(config.model, quiet=quiet, reward=task == "reward", sharded=sharded)
    if task == "classify":
        assert labels is not None, "a classifier needs its labels"
        return load_classifier(config.model, labels, quiet=quiet)
    if task == "mlm":
        return load_masked_lm(config.model, quiet=quiet)
    return load_seq2seq_lm(config.model, for_training=True, quiet=quiet)


def train_and_save(
    trainer,
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    stats: TokenizeStats,
    evaluate: bool,
    quiet: bool = False,
    card_extra: str = "",
    image_processor=None,
    folder: str | None = None,
) -> StageResult:
    """The end every trainer-based driver shares: resume from the latest complete checkpoint
    (`train.resume`), train, evaluate when there is evaluation data, save the adapter (or the
    whole model when adapter.method is none) with tokenizer, template and card, under
    output_dir/`folder` (default: adapter or model). A preference stage's frozen reference copy
    of the adapter is not saved (`final_adapter`)."""
    output_dir = Path(config.train.output_dir)
    # Decided once, by the main process: every process resumes from the same checkpoint.
    resume = distributed.broadcast(
        resolve_resume(output_dir, config.train.resume, run_id(config)) if distributed.is_main() else None
    )
    if resume and not quiet:
        console.print(f"[bold]resuming[/] from {resume} (train.resume: {config.train.resume})")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)  # train_loss: the whole run's, also when resumed
    if evaluate:
        metrics.update(final_evaluation(trainer))
    kind = "adapter" if config.adapter.method != "none" else "model"
    artifact = output_dir / (folder or kind)
    state_dict = sharded_state_dict(trainer, config)  # collective: every process takes part
    if distributed.is_main():
        save_artifact(
            final_adapter(trainer.model),
            tokenizer,
            template,
            artifact,
            kind,
            config,
            card_extra,
            image_processor,
            state_dict=state_dict,
        )
    distributed.barrier()
    if not quiet:
        console.print(f"[bold green]saved[/] {kind} to {artifact}")
    loss = metrics.get("train_loss", result.training_loss)
    return StageResult(output_dir, artifact, loss, result.global_step, stats, metrics)


def sharded_state_dict(trainer, config: RunConfig) -> dict | None:
    """The whole model's state, gathered from every process, when the strategy shards parameters
    (FSDP, ZeRO-3); None when each process holds them all (one process, DDP, ZeRO-2)."""
    if distributed.world_size() <= 1 or not config.train.distributed.shards_parameters:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def final_evaluation(trainer) -> dict[str, float]:
    """The evaluation at the end, run once: when the last step was just evaluated (eval_steps
    divides it), that evaluation's metrics; else a new one."""
    step = trainer.state.global_step
    for row in reversed(trainer.state.log_history):
        if row.get("step") == step and any(key.startswith("eval_") for key in row):
            return {k: v for k, v in row.items() if k.startswith("eval_")}
    return trainer.evaluate()


def optimizer_steps(config: RunConfig, examples: int) -> int:
    """How many optimizer steps the run takes: train.max_steps, or epochs over `examples` in
    global batches (batch_size x grad_accum x the processes running)."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    batch = config.train.batch_size * config.train.grad_accum * distributed.world_size()
    per_epoch = max(1, math.ceil(examples / batch))
    return max(1, math.ceil(per_epoch * config.train.epochs))


def pissa_init_dir(config: RunConfig) -> Path:
    """Where a PiSSA run keeps its initial adapter (needed to convert the final one)."""
    return Path(config.train.output_dir) / "pissa_init"
