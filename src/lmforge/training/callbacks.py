"""Trainer callbacks: metrics.jsonl + loss.png, a progress bar with tokens/s, complete-checkpoint
markers, and a guard that stops on non-finite gradients.

These use `TrainerCallback`, the hook transformers documents for exactly this.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

COMPLETE_MARKER = "LMFORGE_COMPLETE"


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step."""


def mark_complete(checkpoint: Path, step: int) -> None:
    """Written last, atomically: a checkpoint without it was interrupted mid-save."""
    tmp = checkpoint / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}), encoding="utf-8")
    os.replace(tmp, checkpoint / COMPLETE_MARKER)


class CompleteCheckpointCallback(TrainerCallback):
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        # Trainer calls on_save after every file of the checkpoint is written.
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            # Trainer pickles its arguments (training_args.bin) for people to read, never to resume;
            # lmforge keeps no pickles: the same arguments as JSON instead.
            pickled = checkpoint / "training_args.bin"
            if pickled.is_file():
                (checkpoint / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
                pickled.unlink()
            mark_complete(checkpoint, state.global_step)


class NonFiniteGradientCallback(TrainerCallback):
    """Stop at the first step whose (clipped) gradients are not finite."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kw):
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
            raise NonFiniteError(
                f"gradient norm is not finite at step {state.global_step + 1}: training stopped. "
                "Lower train.lr, keep train.max_grad_norm > 0, or use dtype float32/bfloat16 "
                "instead of float16."
            )


class MetricsFileCallback(TrainerCallback):
    """Append every log to metrics.jsonl (with step, epoch, wall time) and plot loss.png at the end."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": round(time.time() - self.start, 3),
        }
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(self.path, self.path.parent / "loss.png")


def plot_loss(metrics_path: Path, out: Path) -> None:
    if not metrics_path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "eval_loss" in row:
            evals.append((row["step"], row["eval_loss"]))
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


class ProgressCallback(TrainerCallback):
    """A rich progress bar: step, loss, non-padding tokens/s and ETA."""

    def __init__(self, description: str = "train") -> None:
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.t0 = 0.0
        self.tokens0 = 0
        self.loss = math.nan

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, loss="-", tps="-"
        )
        self.t0 = time.time()
        self.tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        if self.progress is None:
            return
        elapsed = max(time.time() - self.t0, 1e-6)
        tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
        self.progress.update(self.task, completed=state.global_step, tps=f"{tps:,.0f}")

    def on_log(self, args, state, control, logs=None, **kw):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class AdaLoraRankCallback(TrainerCallback):
    """AdaLoRA's rank re-allocation, once per optimizer step.

    peft's AdaLoRA only prunes ranks when the training loop calls
    `update_and_allocate(step)` after the optimizer step and before gradients are zeroed;
    transformers' Trainer never does, so without this callback AdaLoRA silently trains as a
    fixed-rank LoRA. `on_optimizer_step` is exactly that point in the loop.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
