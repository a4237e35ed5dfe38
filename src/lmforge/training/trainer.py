"""The trainer every lmforge training stage runs: trl's SFTTrainer, on its fast path.

Why a subclass: trl 1.16's SFTTrainer computes its default loss through a fused LM head
that projects in tiles and also derives per-token entropy and top-1 accuracy. On CPU and
for small vocabularies that made a LoRA step ~2.3x slower than the model's own
cross-entropy (measured in `bench/sft_throughput.py`). `compute_loss` is the documented
hook for changing the loss, so we route it back to `transformers.Trainer.compute_loss`
(the model's own loss, with `num_items_in_batch` for exact gradient accumulation; through
`training/compat.py`, the one place that reaches past trl's API) and
compute token accuracy from the logits that path already has. `training_step` adds one
check: a non-finite loss stops the run and names the step, instead of the Trainer's
default of averaging it away.
"""

from __future__ import annotations

import importlib.util

import torch
from datasets import Dataset
from transformers import (
    PreTrainedTokenizerBase,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

from lmforge.config import RunConfig
from lmforge.config.train import TrainConfig
from lmforge.data.tokenize import PackedRowsCollator, PaddingFreeRowsCollator
from lmforge.distributed import world_size
from lmforge.losses.ce import summed_cross_entropy
from lmforge.models.hardware import Hardware
from lmforge.optim import build_optimizer
from lmforge.optim.sophia import SophiaG, estimate_hessian
from lmforge.training.callbacks import (
    AdaLoraRankCallback,
    MemoryReportCallback,
    MetricsFileCallback,
    NonFiniteError,
    NonFiniteGradientCallback,
    ProgressCallback,
)
from lmforge.training.checkpoints import CompleteCheckpointCallback, run_id
from lmforge.training.compat import log_metric, model_loss, shard_on_cpu
from lmforge.training.kernels import set_kernels


class ForgeTrainer(SFTTrainer):
    """SFTTrainer with the model's own loss (fast path), a per-step finiteness check, and
    Sophia's periodic Hessian estimate."""

    _hessian_step = -1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = model_loss(self, model, inputs, num_items_in_batch)
        mode = "train" if model.training else "eval"
        aux_loss = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if aux_loss is not None:  # MoE-DoRA's load-balancing term (already in the loss)
            aux = self.accelerator.reduce(aux_loss.detach(), reduction="mean")  # over the processes
            log_metric(self, mode, "moe_aux_loss", aux.item())
        labels = inputs.get("labels")
        logits = getattr(outputs, "logits", None)
        if labels is not None and logits is not None:
            with torch.no_grad():
                shifted = labels[..., 1:]
                mask = shifted != -100
                correct = (logits[..., :-1, :].argmax(-1) == shifted) & mask
                # Every process's tokens (a collective: each process computes its loss here).
                counts = torch.stack([correct.sum(), mask.sum()])
                right, valid = self.accelerator.reduce(counts, reduction="sum").tolist()
                if valid > 0:
                    log_metric(self, mode, "mean_token_accuracy", right / valid)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        step = self.state.global_step
        if isinstance(optimizer, SophiaG) and optimizer.hessian_due(step) and self._hessian_step != step:
            # Before this step's first backward: the estimate runs its own backward and zeroes grads.
            self._hessian_step = step
            device = self.args.device
            estimate_hessian(
                model, {k: v.to(device) for k, v in inputs.items() if torch.is_tensor(v)}, optimizer
            )
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteError(
                f"loss is {loss.item()} at step {self.state.global_step + 1}: training stopped. "
                "Lower train.lr, check the data for empty responses, or use dtype float32/bfloat16."
            )
        return loss


def common_arguments(train: TrainConfig, hardware: Hardware, has_eval: bool) -> dict:
    """`train:` as transformers TrainingArguments keywords, shared by every stage's trl config."""
    warmup: float = train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio
    save_strategy = "steps" if train.save_steps > 0 else "no"
    # eval_steps 0 is "at the end only": train_and_save evaluates once after training.
    eval_strategy = "steps" if has_eval and train.eval_steps > 0 else "no"
    on_gpu = hardware.device in ("cuda", "xpu")  # mixed precision on either; the Trainer finds the XPU
    return {
        "output_dir": train.output_dir,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.lr,
        **schedule_arguments(train),
        **optimizer_arguments(train),
        "warmup_steps": warmup,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": train.seed,
        "data_seed": train.seed,
        "activation_checkpointing": train.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if train.gradient_checkpointing else None,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,  # a NaN must stop the run, not be averaged away
        "save_strategy": save_strategy,
        "save_steps": train.save_steps or 500,
        # lmforge rotates checkpoints itself, after the new one is marked complete
        # (training/checkpoints.CompleteCheckpointCallback); the Trainer's rotation ran before.
        "save_total_limit": None,
        "eval_strategy": eval_strategy,
        "eval_steps": train.eval_steps or None,
        "report_to": ["tensorboard"] if train.tensorboard else [],
        "disable_tqdm": True,  # lmforge's own progress bar shows tokens/s and ETA
        "use_cpu": not on_gpu,
        "bf16": on_gpu and hardware.dtype == torch.bfloat16,
        "fp16": on_gpu and hardware.dtype == torch.float16,
        "remove_unused_columns": False,
        "save_only_model": False,
        "dataloader_num_workers": 0,
        **distributed_arguments(train, hardware),
    }


def distributed_arguments(train: TrainConfig, hardware: Hardware) -> dict:
    """train.distributed as TrainingArguments keywords: gloo between CPU processes, FSDP2's
    fsdp_config, or the DeepSpeed config (docs/distributed.md). One process is left as it is,
    but for DeepSpeed (ZeRO offload helps one GPU too)."""
    spread = train.distributed
    arguments: dict = {}
    if world_size() > 1 and hardware.device == "cpu":
        arguments["ddp_backend"] = "gloo"
    if spread.strategy == "fsdp":
        fsdp_config = {
            "version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_offload": spread.offload == "all",
        }
        arguments.update(fsdp=True, fsdp_config={**fsdp_config, **spread.fsdp})
    if spread.strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "train.distributed.strategy deepspeed needs DeepSpeed: pip install 'lmforge[deepspeed]'"
            )
        arguments["deepspeed"] = spread.config_file or deepspeed_config(spread)
    return arguments


def deepspeed_config(spread) -> dict:
    """The DeepSpeed config of a ZeRO stage and offload; `auto` values are filled in by
    transformers from the TrainingArguments (batch size, accumulation, clipping, precision), so
    `train:` stays the one place they are set."""
    zero: dict = {"stage": spread.zero_stage, "overlap_comm": False}
    if spread.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spread.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if spread.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def schedule_arguments(train: TrainConfig) -> dict:
    """train.scheduler as transformers' scheduler name and keywords (warmup applies to each)."""
    if train.scheduler == "none":
        return {"lr_scheduler_type": "constant_with_warmup"}
    if train.scheduler == "cosine_with_min_lr" or (train.scheduler == "cosine" and train.min_lr_ratio):
        return {
            "lr_scheduler_type": "cosine_with_min_lr",
            "lr_scheduler_kwargs": {"min_lr_rate": train.min_lr_ratio or 0.1},
        }
    if train.scheduler == "polynomial":
        kwargs = {"lr_end": train.lr * train.min_lr_ratio, "power": train.scheduler_power}
        return {"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": kwargs}
    return {"lr_scheduler_type": train.scheduler}


TRANSFORMERS_OPTIM = {
    "adamw": "adamw_torch",
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


def optimizer_arguments(train: TrainConfig) -> dict:
    """The AdamW family is built by transformers (its betas/eps as TrainingArguments); every other
    optimizer by lmforge.optim, passed to the trainer ready-made (`optim` is then unused)."""
    if train.optimizer not in TRANSFORMERS_OPTIM:
        return {"optim": "adamw_torch"}
    options = train.optimizer_options
    return {
        "optim": TRANSFORMERS_OPTIM[train.optimizer],
        "adam_beta1": options.betas[0],
        "adam_beta2": options.betas[1],
        "adam_epsilon": options.eps,
    }


def training_arguments(
    train: TrainConfig,
    hardware: Hardware,
    max_length: int,
    has_eval: bool,
    padding_free: bool,
) -> SFTConfig:
    """Translate `train:` into trl's SFT arguments."""
    return SFTConfig(
        **common_arguments(train, hardware, has_eval),
        include_num_input_tokens_seen="non_padding",
        # lmforge truncates while tokenizing; trl only needs it for its own preparation (skipped).
        max_length=None if padding_free else max_length,
        padding_free=padding_free,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        dataset_kwargs={"skip_prepare_dataset": True},  # lmforge tokenizes and masks itself
    )


def stage_optimizer(config: RunConfig, model) -> torch.optim.Optimizer | None:
    """The optimizer lmforge builds: LoRA+'s AdamW, or one of lmforge.optim's (Lion, Sophia,
    Muon, torch's Adafactor, SGD); None when the Trainer builds its own (the AdamW family)."""
    if config.adapter.loraplus_lr_ratio is None:  # else train.optimizer is AdamW (checked in RunConfig)
        return build_optimizer(config.train, model)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=config.train.lr,
        loraplus_lr_ratio=config.adapter.loraplus_lr_ratio,
        weight_decay=config.train.weight_decay,
    )


def stage_callbacks(config: RunConfig, model, stage: str, quiet: bool) -> list:
    """lmforge's callbacks for any stage: checkpoint markers and rotation (first: it sets the whole
    run's train_loss before the others log it), metrics file, NaN guard, memory report, progress."""
    # Preference and reward stages run each example's chosen and rejected rows through the model.
    rows = 2 if stage in ("dpo", "orpo", "simpo", "reward") else 1
    callbacks = [
        CompleteCheckpointCallback(run_id(config), config.train.save_total_limit),
        MetricsFileCallback(config.train.output_dir),
        NonFiniteGradientCallback(model),
    ]
    if config.train.progress and not quiet:  # before the memory report: the bar ends before its line
        callbacks.append(ProgressCallback(stage))
    callbacks.append(MemoryReportCallback(model, config.train, config.data.max_length, rows, quiet))
    if config.adapter.method == "adalora":
        callbacks.append(AdaLoraRankCallback())
    return callbacks


def build_trainer(
    config: RunConfig,
    model,
    tokenizer: PreTrainedTokenizerBase,
    hardware: Hardware,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    stage: str,
    quiet: bool = False,
    trainer_class: type[ForgeTrainer] | None = None,
    **trainer_kwargs,
) -> ForgeTrainer:
    """The SFT/pre-training trainer with lmforge's callbacks and collators (`trainer_class`: a
    ForgeTrainer subclass with its own loss, e.g. distillation's, given `trainer_kwargs`)."""
    # With flash-attn, trl's padding-free collator flattens each batch (varlen kernels attend
    # within examples). With SDPA/eager attention a flattened batch gets one dense mask, so our
    # collators keep rows: packed rows as they are, unpacked examples packed into rows as wide as
    # the batch's longest (see data/tokenize.py). Without padding_free: trl's padded batches.
    # Pre-training rows are packed blocks (data/tokenize.py `text_blocks`), like packed SFT rows.
    flash = hardware.attn_implementation == "flash_attention_2"
    packed = config.data.packing or stage == "pretrain"
    wants_padding_free = packed or config.train.padding_free
    collator = None
    if wants_padding_free and not flash:
        pad = tokenizer.pad_token_id
        collator = PackedRowsCollator(pad) if packed else PaddingFreeRowsCollator(pad)
    padding_free = wants_padding_free and flash
    args = training_arguments(
        config.train, hardware, config.data.max_length, eval_dataset is not None, padding_free
    )
    # Training never needs a KV cache, and with one transformers would not detect the packed rows
    # of padding-free batches (attention would then cross examples).
    model.config.use_cache = False
    return stage_trainer(
        trainer_class or ForgeTrainer,
        config,
        model,
        stage,
        quiet,
        **trainer_kwargs,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # Otherwise trl's DataCollatorForLanguageModeling: it pads labels with -100 (so a pad id
        # equal to EOS never hides EOS from the loss) and implements padding_free.
        data_collator=collator,
    )


def stage_trainer(
    trainer_class: type, config: RunConfig, model, stage: str, quiet: bool, callbacks=(), **kwargs
):
    """A `trainer_class` (any transformers or trl trainer) with lmforge's optimizer and callbacks
    (`callbacks` added after them) and `kwargs`; the Trainer's printer is off: metrics go to
    metrics.jsonl and the progress bar."""
    args = kwargs.get("args")
    if args is not None:
        set_kernels(args, config.train, model)
    if args is not None and world_size() > 1:
        # DDP's search for parameters a step did not use costs a graph walk per step and warns on
        # every process when there are none; only MoE-DoRA's top-k routing leaves some unused.
        args.ddp_find_unused_parameters = config.adapter.method == "moe_dora"
    trainer = lmforge_trainer(trainer_class)(
        model=model,
        callbacks=[*stage_callbacks(config, model, stage, quiet), *callbacks],
        optimizers=(stage_optimizer(config, model), None),
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CompleteCheckpointCallback):
            callback.trainer = trainer  # its checkpoints record the loss so far
    return trainer


def batch_tokens(inputs: dict) -> int:
    """The non-padding tokens a batch runs through the model, from its attention masks:
    `attention_mask`, else every `*attention_mask` but the prompt's (the chosen, rejected or
    completion sequences of preference and KTO batches already include their prompt)."""
    if "attention_mask" in inputs:
        masks = [inputs["attention_mask"]]
    else:
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
    return int(sum(int(m.sum()) for m in masks if isinstance(m, torch.Tensor)))


class TokenCounting:
    """For trainers whose batches transformers cannot count (no `input_ids`: ORPO, SimPO, KTO) or
    whose config does not ask it to (reward): `state.num_input_tokens_seen` counted from the
    batch's attention masks, so every stage's progress bar shows real tokens/s. A batch of raw
    rows (GRPO's, which counts its prompts and completions itself) is left alone."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.include_num_input_tokens_seen == "no" and isinstance(inputs, dict):
            count = torch.tensor(batch_tokens(inputs), device=self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum())
        return super().training_step(model, inputs, num_items_in_batch)


class ShardsOnCpu:
    """FSDP2 between CPU processes too (see `compat.shard_on_cpu`)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        shard_on_cpu(self)


class EndsAtMaxSteps:
    """transformers (5.23) checks `max_steps` only after a step, so a `train()` resumed from a
    checkpoint at `max_steps` ran one step more: rerunning a finished run (train.resume auto)
    changed it. Once `max_steps` is reached, no more batches are drawn and training stops."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)


def lmforge_trainer(trainer_class: type) -> type:
    """`trainer_class` with `TokenCounting` and `EndsAtMaxSteps` in front (once)."""
    if issubclass(trainer_class, TokenCounting):
        return trainer_class
    bases = (TokenCounting, EndsAtMaxSteps, ShardsOnCpu, trainer_class)
    return type(trainer_class.__name__, bases, {"__doc__": trainer_class.__doc__})


def labelled_trainer(
    config: RunConfig,
    model,
    tokenizer: PreTrainedTokenizerBase,
    hardware: Hardware,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    stage: str,
    quiet: bool,
    collator,
    seq2seq: bool = False,
):
    """transformers' Trainer (Seq2SeqTrainer for an encoder-decoder) for the stages trl has no
    trainer for (classification, masked LM, seq2seq SFT): lmforge's optimizer and callbacks, the
    summed cross-entropy (exact under gradient accumulation) and `eval_accuracy`, the share of
    labelled positions predicted right."""
    arguments_class, trainer_class = (
        (Seq2SeqTrainingArguments, Seq2SeqTrainer) if seq2seq else (TrainingArguments, Trainer)
    )
    args = arguments_class(
        **common_arguments(config.train, hardware, eval_dataset is not None),
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if config.train.group_by_length else "random",
    )
    return stage_trainer(
        trainer_class,
        config,
        model,
        stage,
        quiet,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_loss_func=summed_cross_entropy,
        compute_metrics=label_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
    )


def argmax_logits(logits, labels) -> torch.Tensor:
    """The Trainer's `preprocess_logits_for_metrics`: each position's top class only, so evaluation
    gathers ids instead of batch x length x vocabulary floats (the first output when the model
    returns several, e.g. a seq2seq model's encoder states)."""
    if isinstance(logits, tuple | list):
        logits = logits[0]
    return logits.argmax(-1)


def label_accuracy(eval_prediction) -> dict[str, float]:
    """The Trainer's `compute_metrics`: the share of predicted ids equal to their labels, positions
    labelled -100 left out (masked-LM: the masked tokens; seq2seq: the target tokens, teacher-forced;
    classification: every example)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    mask = labels != -100
    correct = (predictions == labels) & mask
    return {"accuracy": float(correct.sum() / max(int(mask.sum()), 1))}
