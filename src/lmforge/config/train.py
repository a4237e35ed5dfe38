"""`train:` — the optimisation loop, checkpoints and logging."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config.base import Section


class TrainConfig(Section):
    output_dir: str = Field("runs/sft", description="Folder for checkpoints, logs and the result.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "polynomial"
    ] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "paged_adamw_8bit", "sgd"] = Field(
        "adamw_torch", description="Optimizer (transformers names)."
    )
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
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
        "none", description="`auto`: latest complete checkpoint in output_dir; a path; or `none`."
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
