"""The one place lmforge reaches past trl's and transformers' public API.

Each use below says what it relies on and the versions it was checked against (`CHECKED`);
tests/training/test_compat.py runs each against the installed libraries and fails when one
changes underneath, so an upgrade breaks a test here instead of a metric silently
(`shard_on_cpu` needs several processes: tests/training/test_distributed.py's FSDP2 runs).
(`trl.experimental`'s ORPO and SimPO, public but unstable, sit in `training/trl_experimental.py`.)
"""

from __future__ import annotations

from transformers import Trainer

CHECKED = {"trl": "1.16.0", "transformers": "5.23.0", "accelerate": "1.15.0"}


def log_metric(trainer: Trainer, mode: str, name: str, value: float) -> None:
    """Add `value` to what the trainer logs as `name` on its next log line (the mean of the values
    added since the last one); `mode` is "train" or "eval".

    trl's stable trainers (SFT, DPO, KTO, GRPO, Reward) keep these values in `_metrics[mode]`, a
    dict of lists that their `log` averages and clears; the experimental ORPO/CPO trainers keep
    them through `store_metrics(metrics, train_eval=mode)`.
    """
    metrics = getattr(trainer, "_metrics", None)
    if metrics is not None:
        metrics[mode][name].append(value)
    elif hasattr(trainer, "store_metrics"):
        trainer.store_metrics({name: value}, train_eval=mode)
    else:
        raise TypeError(f"{type(trainer).__name__} keeps no per-step metrics lmforge knows how to add to")


def pending_metrics(trainer: Trainer, mode: str) -> dict[str, list[float]]:
    """The values a stable trl trainer will average into its next log line (see `log_metric`),
    to derive new ones from before `log` runs (DPO's log-ratios from trl's rewards)."""
    return trainer._metrics[mode]


def model_loss(trainer: Trainer, model, inputs: dict, num_items_in_batch=None):
    """(loss, outputs): the model's own loss as `transformers.Trainer.compute_loss` computes it
    (`num_items_in_batch` makes it exact under gradient accumulation), skipping trl's
    `SFTTrainer.compute_loss`, which adds a tiled LM-head projection for entropy and accuracy that
    made CPU LoRA steps ~2.3x slower (bench/sft_throughput.py)."""
    return Trainer.compute_loss(
        trainer, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
    )


def losses_so_far(trainer: Trainer) -> float:
    """The sum of the per-step training losses since this `train()` call began (its first step, or
    the checkpoint it resumed from), as `Trainer` keeps it for its final `train_loss`: the sum
    drained at each logging step (`_total_loss_scalar`) plus what has accumulated since
    (`_tr_loss`); this process's, as the Trainer's own final figure is."""
    return trainer._total_loss_scalar + float(trainer._tr_loss.item())


def shard_on_cpu(trainer: Trainer) -> None:
    """Run FSDP2 between CPU processes. accelerate (1.15) keeps FSDP only for accelerator devices:
    on several CPU processes its state says MULTI_CPU and drops the FSDP plugin the Trainer built
    from `fsdp_config`, so the model would be wrapped for DDP. torch's `fully_shard` works on CPU
    with gloo; this sets the shared state to FSDP with the Trainer's own plugin, as accelerate sets
    it on GPUs, before anything is prepared (the Trainer reads `is_fsdp_enabled` from then on).
    Both shared states: each `AcceleratorState()` copies `PartialState`'s distributed_type."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True
