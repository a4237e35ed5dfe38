"""Trainer callbacks: metrics.jsonl + loss.png, a progress bar with tokens/s, a guard that stops on
non-finite gradients, and a memory report (estimated peak at the start, measured peaks at the end).
(Checkpoint markers and rotation: `training/checkpoints`.)

These use `TrainerCallback`, the hook transformers documents for exactly this.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from lmforge.artifacts import atomic_file
from lmforge.config.train import DistributedConfig, TrainConfig
from lmforge.distributed import world_size

MB = 1024**2  # the memory report's "mb" is MiB
console = Console(stderr=True)


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step."""


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
        # A resumed run's lines continue the clock of the lines kept from before the checkpoint.
        self.start = time.time() - last_time(self.path)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": round(time.time() - self.start, 3),
        }
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        if state.num_input_tokens_seen and "loss" in record:  # every stage's, counted or not by transformers
            record.setdefault("num_input_tokens_seen", state.num_input_tokens_seen)
        append_record(self.path, record)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss(self.path, self.path.parent / "loss.png")


def last_time(metrics_path: Path) -> float:
    """The `time` of metrics.jsonl's last line (0 without one)."""
    if not metrics_path.is_file():
        return 0.0
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    return float(json.loads(lines[-1]).get("time", 0.0)) if lines else 0.0


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line appended to metrics.jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


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
            console=console,  # the console lmforge prints on: lines go above the bar, never onto it
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


# --- memory report --------------------------------------------------------------------------------

# Tensors a decoder layer keeps for its backward pass, per token, in the activation dtype: 11 of
# width hidden (the two norms' inputs and outputs, q/k/v, q/k after rotary, the attention output,
# o_proj's input, ...) and 4 of width intermediate (gate, up, act(gate), their product: SwiGLU).
# The counting of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models") for a Llama-style layer with SDPA/flash attention, which keep no s x s score matrix.
# Checked against torch's saved-tensor hooks on a Llama (h 1024, i 2816): 19-22 x b·s·h in fp32,
# this gives 22. 16-bit models also keep their norms' fp32 copies: 2 x hidden x 4 bytes more.
ACTIVATION_PER_HIDDEN = 11
ACTIVATION_PER_INTERMEDIATE = 4
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' optimizer states in 32 bits


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs at its peak, by part (see `estimate_memory`)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_record(self) -> dict[str, float]:
        """The estimate in MiB, as metrics.jsonl keys."""
        parts = ("weights", "gradients", "optimizer", "activations")
        record = {f"estimated_{part}_mb": round(getattr(self, part) / MB, 1) for part in parts}
        return {"estimated_peak_mb": round(self.total / MB, 1), **record}

    def per_process(self, spread: DistributedConfig, processes: int) -> MemoryEstimate:
        """What each of `processes` holds under `spread` (docs/distributed.md): DDP all of it;
        ZeRO-2 1/N of gradients and optimizer states; FSDP2 and ZeRO-3 1/N of the weights too
        (activations stay per process); offloaded states (and weights) in CPU memory instead."""
        if processes <= 1 or spread.strategy == "ddp":
            return self
        optimizer = 0 if spread.offload != "none" else self.optimizer // processes
        weights = self.weights // processes if spread.shards_parameters else self.weights
        if spread.offload == "all":
            weights = 0
        return MemoryEstimate(weights, self.gradients // processes, optimizer, self.activations)

    def describe(self) -> str:
        def mb(n: int) -> str:
            return f"{n / MB:,.1f} MB"

        return (
            f"~{mb(self.total)} (weights {mb(self.weights)} + gradients {mb(self.gradients)} + "
            f"optimizer {mb(self.optimizer)} + activations {mb(self.activations)})"
        )


def _numel(param: torch.Tensor) -> int:
    """A parameter's whole size, also when DeepSpeed ZeRO-3 has partitioned it away (its local
    tensor is then empty; `ds_numel` keeps the size). FSDP2's DTensors report theirs."""
    return getattr(param, "ds_numel", param.numel())


def optimizer_state_bytes(model: torch.nn.Module, optimizer_name: str, momentum: bool = False) -> int:
    """Bytes of optimizer state for `model`'s trainable parameters (states in the parameter's dtype,
    as torch keeps them). AdamW and Sophia keep two tensors per parameter, Lion one, SGD one with
    momentum (`momentum`) else none; Adafactor a row and a column vector per matrix; Muon one for
    its hidden matrices and AdamW's two for the rest; bitsandbytes' 8-bit AdamW two bytes per
    element (eight for tensors under 4096 elements, which it keeps in 32 bits)."""
    muon_ids: set[int] = set()
    if optimizer_name == "muon":
        from lmforge.optim.muon import split_muon_params

        muon_ids = {id(param) for _, param in split_muon_params(model)[0]}
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        numel, size = _numel(param), param.element_size()
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition's is empty
        if optimizer_name in ("adamw_8bit", "paged_adamw_8bit"):
            total += 2 * numel if numel >= BNB_MIN_8BIT_SIZE else 8 * numel
        elif optimizer_name == "adafactor" and len(shape) >= 2:
            rows, cols = shape[-2], shape[-1]
            total += (numel // cols + numel // rows) * size
        elif optimizer_name == "adafactor" or (optimizer_name == "sgd" and momentum) or id(param) in muon_ids:
            total += numel * size
        elif optimizer_name == "lion":
            total += numel * size
        elif optimizer_name != "sgd":  # the AdamW family (LoRA+ too), Sophia, Muon's AdamW part
            total += 2 * numel * size
    return total


def _activation_dtype_size(model: torch.nn.Module) -> int:
    """Element size of the dtype most of the weights are in (activations run in it)."""
    by_dtype: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            by_dtype[param.dtype] = by_dtype.get(param.dtype, 0) + param.numel()
    if not by_dtype:  # every weight packed (4-bit): the compute dtype is 16-bit
        return 2
    return torch.empty((), dtype=max(by_dtype, key=by_dtype.__getitem__)).element_size()


def estimate_memory(
    model: torch.nn.Module,
    optimizer_name: str,
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    momentum: bool = False,
) -> MemoryEstimate:
    """A rough peak of one training step, in bytes:

    - weights: every parameter at its storage size (a 4-bit weight is half a byte);
    - gradients: the trainable parameters at their dtype's size;
    - optimizer: see `optimizer_state_bytes`;
    - activations: per layer b x s x (11 x hidden + 4 x intermediate) x element size, plus
      b x s x 2 x hidden x 4 in a 16-bit model (its norms compute in fp32), see
      ACTIVATION_PER_HIDDEN; with gradient checkpointing only each layer's input (b x s x hidden)
      plus one layer's full activations; plus the logits, b x s x vocab x (element size + 8) for
      the fp32 copy the loss takes and its gradient.

    Not counted: the CUDA context (~0.3-0.5 GB), allocator fragmentation, a separate reference or
    teacher model, and the temporary buffers of the kernels.
    """
    params = list(model.parameters())
    weights = sum(_numel(param) * param.element_size() for param in params)
    gradients = sum(_numel(param) * param.element_size() for param in params if param.requires_grad)
    optimizer = optimizer_state_bytes(model, optimizer_name, momentum)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    activations = 0
    if hidden and layers:
        intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
        vocab = getattr(text, "vocab_size", None) or 0
        size = _activation_dtype_size(model)
        tokens = batch_size * seq_len
        layer = tokens * (ACTIVATION_PER_HIDDEN * hidden + ACTIVATION_PER_INTERMEDIATE * intermediate) * size
        if size < 4:
            layer += tokens * 2 * hidden * 4
        activations = tokens * hidden * size * layers + layer if gradient_checkpointing else layer * layers
        activations += tokens * vocab * (size + 8)
    return MemoryEstimate(weights, gradients, optimizer, activations)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: an FSDP2 DTensor's shard, a ZeRO-3 parameter's
    partition (`ds_tensor`), else the tensor."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def held_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes of weights and optimizer states this process holds now (measured on its tensors,
    shards only where a strategy shards them); the gradients are freed after each step."""
    weights = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    while optimizer is not None and not isinstance(getattr(optimizer, "state", None), Mapping):
        optimizer = getattr(optimizer, "optimizer", None)  # accelerate's and DeepSpeed's wrappers
    states = getattr(optimizer, "state", {}) or {}
    kept = [v for state in states.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"weights": weights, "optimizer": sum(_local(v).numel() * v.element_size() for v in kept)}


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (None where it cannot be read)."""
    try:
        import resource
    except ImportError:  # Windows: psutil, when installed, reports the peak working set
        try:
            import psutil
        except ImportError:
            return None
        return getattr(psutil.Process().memory_info(), "peak_wset", None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measured_peaks(device: torch.device) -> dict[str, float]:
    """Measured peaks in MiB: process RSS, and the accelerator's allocated/reserved memory."""
    peaks: dict[str, float] = {}
    rss = peak_rss_bytes()
    if rss is not None:
        peaks["peak_rss_mb"] = round(rss / MB, 1)
    if device.type == "cuda":
        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / MB, 1)
        peaks["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / MB, 1)
    elif device.type == "xpu":
        peaks["peak_xpu_mb"] = round(torch.xpu.max_memory_allocated(device) / MB, 1)
    return peaks


PEAK_LABELS = {
    "peak_rss_mb": "peak RSS (whole process)",
    "peak_cuda_mb": "peak CUDA allocated",
    "peak_cuda_reserved_mb": "reserved",
    "peak_xpu_mb": "peak XPU allocated",
}


def batch_summary(train: TrainConfig) -> str:
    """What one optimizer step takes: train.batch_size per process x processes x grad_accum."""
    processes, per_step = world_size(), train.batch_size * train.grad_accum * world_size()
    spread = f" per process x {processes} processes" if processes > 1 else ""
    return f"{train.batch_size}{spread} x {train.grad_accum} accumulation = {per_step} examples per step"


class MemoryReport:
    """The estimated peak memory printed when training starts; the measured peaks (process RSS,
    CUDA/XPU allocations during training) printed when it ends and appended to metrics.jsonl with
    the estimate (`peak_rss_mb`, `peak_cuda_mb`, `estimated_peak_mb`, ...) and what the main
    process holds then (`held_weights_mb`, `held_optimizer_mb`: its shards under FSDP2/ZeRO-3).
    Trainer stages run it as `MemoryReportCallback`; PPO's loop calls `start` and `end` itself."""

    def __init__(
        self,
        model: torch.nn.Module,
        train: TrainConfig,
        seq_len: int,
        rows_per_example: int = 1,
        quiet: bool = False,
    ) -> None:
        self.model = model
        self.train = train
        self.seq_len = seq_len
        self.rows = rows_per_example
        self.quiet = quiet
        self.path = Path(train.output_dir) / "metrics.jsonl"
        self.estimate: MemoryEstimate | None = None

    def start(self, device: torch.device, main: bool = True) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the training peak, weights included
        elif device.type == "xpu":
            torch.xpu.reset_peak_memory_stats(device)
        if not main:
            return
        options = self.train.optimizer_options
        self.estimate = estimate_memory(
            self.model,
            self.train.optimizer,
            self.train.batch_size * self.rows,
            self.seq_len,
            self.train.gradient_checkpointing,
            momentum=bool(getattr(options, "momentum", 0)),
        ).per_process(self.train.distributed, world_size())
        if not self.quiet:
            each = " per process" if world_size() > 1 else ""
            console.print(f"[bold]memory[/]: estimated peak{each} {self.estimate.describe()}")

    def end(
        self, device: torch.device, step: int, epoch: float | None, main: bool = True, optimizer=None
    ) -> None:
        if not main:
            return
        peaks = measured_peaks(device)
        held = {f"held_{k}_mb": round(v / MB, 1) for k, v in held_bytes(self.model, optimizer).items()}
        estimate = self.estimate.as_record() if self.estimate else {}
        append_record(self.path, {"step": step, "epoch": epoch, **peaks, **held, **estimate})
        if not self.quiet:
            measured = ", ".join(f"{PEAK_LABELS[key]} {value:,.1f} MB" for key, value in peaks.items())
            against = f" against the estimated ~{self.estimate.total / MB:,.1f} MB" if self.estimate else ""
            console.print(f"[bold]memory[/]: measured {measured or 'no peak (not readable here)'}{against}")


class MemoryReportCallback(TrainerCallback):
    """`MemoryReport` at the Trainer's start and end of training."""

    def __init__(self, *args, **kwargs) -> None:
        self.report = MemoryReport(*args, **kwargs)

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and not self.report.quiet:  # the global batch, then memory
            console.print(f"[bold]batch[/]: {batch_summary(self.report.train)}")
        self.report.start(args.device, state.is_world_process_zero)

    def on_train_end(self, args, state, control, optimizer=None, **kw):
        main = state.is_world_process_zero
        self.report.end(args.device, state.global_step, state.epoch, main, optimizer)
