"""`train:` — the optimisation loop, checkpoints and logging."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section
from lmforge.config.optim import OptimizerName, optimizer_args


class DistributedConfig(Section):
    """How the Trainer spreads a run over the processes a launcher started (docs/distributed.md).
    In one process it changes nothing."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: a full copy per device; fsdp: FSDP2, parameters, gradients and optimizer "
        "states sharded; deepspeed: ZeRO stage `zero_stage` (pip install deepspeed).",
    )
    zero_stage: Literal[2, 3] = Field(
        2, description="deepspeed: 2 shards gradients and optimizer states, 3 the parameters too."
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description="fsdp/deepspeed: keep optimizer states (optimizer) or also parameters (all) in CPU "
        "memory, for models that do not fit otherwise (slower).",
    )
    fsdp: dict[str, Any] = Field(
        default_factory=dict,
        description="fsdp: extra keys of transformers' fsdp_config (e.g. {reshard_after_forward: false}).",
    )
    config_file: str | None = Field(
        None,
        description="deepspeed: a DeepSpeed JSON config used unchanged instead of the one lmforge writes.",
    )

    @property
    def shards_parameters(self) -> bool:
        """Whether each process holds only a share of the parameters (FSDP2, ZeRO-3)."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @model_validator(mode="after")
    def _strategy_keys(self) -> DistributedConfig:
        if self.strategy != "deepspeed" and (self.zero_stage != 2 or self.config_file):
            raise ValueError("train.distributed.zero_stage and config_file apply to strategy deepspeed")
        if self.strategy == "ddp" and self.offload != "none":
            raise ValueError(
                "train.distributed.offload applies to strategy fsdp or deepspeed; ddp keeps all on the device"
            )
        if self.strategy == "fsdp" and self.offload == "optimizer":
            raise ValueError(
                "train.distributed.offload optimizer is DeepSpeed's; FSDP2 offloads parameters, "
                "gradients and optimizer states together: use offload all"
            )
        if self.strategy != "fsdp" and self.fsdp:
            raise ValueError("train.distributed.fsdp applies to strategy fsdp")
        if self.strategy == "deepspeed" and self.zero_stage == 2 and self.offload == "all":
            raise ValueError(
                "train.distributed.offload all (parameters too) needs zero_stage 3; ZeRO-2 offloads "
                "the optimizer only"
            )
        return self


class TrainConfig(Section):
    output_dir: str = Field("runs/sft", description="Folder for checkpoints, logs and the result.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal[
        "cosine", "linear", "polynomial", "none", "constant", "constant_with_warmup", "cosine_with_min_lr"
    ] = Field(
        "cosine",
        description="Learning-rate schedule after warmup: cosine, linear (decay to 0), polynomial "
        "(decay with scheduler_power to min_lr_ratio), none (constant; warmup still applies).",
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="cosine and polynomial: decay to lr x this instead of 0 (e.g. 0.1).",
    )
    scheduler_power: float = Field(1.0, gt=0, description="polynomial: the decay exponent (1 = linear).")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        description="Decoupled weight decay of weight matrices and embeddings (not of norms or biases).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: OptimizerName = Field(
        "adamw_torch",
        description="adamw (= adamw_torch), adamw_torch_fused, adafactor (torch's), lion, sophia (SophiaG), "
        "muon (Muon for hidden matrices + AdamW for the rest), sgd; on CUDA adamw_8bit and "
        "paged_adamw_8bit (bitsandbytes).",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="The optimizer's own parameters, e.g. {betas: [0.9, 0.95]} for AdamW/Lion, "
        "{momentum: 0.95} for Muon, {rho: 0.04, hessian_every: 10} for Sophia "
        "(`lmforge config keys` lists each optimizer's).",
    )
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Fused training kernels: auto = Liger's (fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE) on CUDA when liger-kernel is installed and covers the model, else none; liger = require "
        "them (refused with the reason where they cannot run).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (inductor, on CPU and CUDA); the first steps are slower while "
        "it compiles.",
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    save_steps: int = Field(
        0,
        ge=0,
        description="Write a resumable checkpoint every N steps (0: only the final result).",
    )
    save_total_limit: int | None = Field(2, description="Keep at most N checkpoints (None: all).")
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps (0: at the end only).")
    resume: str = Field(
        "auto",
        description="`auto`: continue from the latest complete checkpoint in output_dir when it is "
        "this run's (same config but for where and how often files are written), start new when "
        "there is none, refuse when output_dir holds another run's; `fresh` (or `none`): start "
        "over, removing output_dir's earlier checkpoints and metrics; or a checkpoint path.",
    )
    padding_free: bool = Field(
        True,
        description="Spend no compute on padding: a batch's examples share rows, position ids "
        "restarting per example (same loss). Turn off for models whose attention ignores "
        "position_ids boundaries.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (faster still; batch order is no "
        "longer uniformly random).",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files under output_dir/runs.")
    progress: bool = Field(True, description="Show a progress bar with tokens/s and ETA.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Several processes (torchrun, accelerate launch, lmforge train --nproc): the strategy.",
    )

    @model_validator(mode="after")
    def _optimizer_and_schedule(self) -> TrainConfig:
        optimizer_args(self.optimizer, self.optimizer_args)
        if self.min_lr_ratio and self.scheduler not in ("cosine", "polynomial", "cosine_with_min_lr"):
            raise ValueError(
                f"train.min_lr_ratio applies to scheduler cosine or polynomial, not {self.scheduler}"
            )
        if self.scheduler_power != 1.0 and self.scheduler != "polynomial":
            raise ValueError(f"train.scheduler_power applies to scheduler polynomial, not {self.scheduler}")
        return self

    @property
    def optimizer_options(self):
        """`optimizer_args` parsed with the chosen optimizer's defaults filled in."""
        return optimizer_args(self.optimizer, self.optimizer_args)
