"""Which process this is when a launcher runs several, and the few collectives lmforge's own
files need.

lmforge never starts processes or talks between them itself: torchrun (torch's elastic launcher,
which `lmforge train --nproc N` hands over to), `accelerate launch` or a cluster's scheduler start
one process per device and set RANK / WORLD_SIZE / LOCAL_RANK; the Trainer (through accelerate)
wraps the model for DDP, FSDP or DeepSpeed and shards the data. What is left to lmforge: only the
main process (global rank 0) prints, writes the run's files and saves results, and the others
wait for it where they read what it wrote (`barrier`, `main_first`). Everything here reads the
environment, so it works before any process group exists and in one process (rank 0 of 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def rank() -> int:
    """This process's global rank (0 when not launched as one of several)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine: which of the machine's GPUs it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the one process that prints and writes (global rank 0)."""
    return rank() == 0


def device_for(device: str) -> str:
    """The device this process puts its model on: its own GPU (cuda:LOCAL_RANK) when several run."""
    return f"cuda:{local_rank()}" if device == "cuda" and world_size() > 1 else device


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one. `accelerate launch --cpu`
    (and `accelerate launch --num_processes N` on a machine without several GPUs) runs its
    single-process launcher whatever N is: it sets MASTER_PORT for N > 1 but no WORLD_SIZE, and
    the run would silently train alone."""
    asked = "MASTER_PORT" in os.environ and "ACCELERATE_USE_CPU" in os.environ
    if asked and "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "accelerate launch started one process although several were asked for (its --cpu "
            "launcher, and any launch on a machine without several GPUs, starts one). Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m lmforge train ...` (on CPU too), "
            "`torchrun --nproc-per-node N -m lmforge train ...`, or `lmforge train CONFIG --nproc N`"
        )


def start(device: str) -> None:
    """Join the launcher's process group now (no-op in one process), so lmforge can wait for the
    main process before the Trainer exists; accelerate's own state, which the Trainer builds
    later, reuses the group."""
    check_launch()
    if world_size() <= 1:
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def finish() -> None:
    """Leave the process group once every process is done: before the interpreter exits, so that
    no communication thread is left running at shutdown (a process exiting with gloo's threads
    alive can abort with "terminate called without an active exception")."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _group_ready() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """The main process's `value`, in every process (picklable values; no-op in one process)."""
    if not _group_ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(tensor):
    """`tensor` summed over every process (in place; itself in one process)."""
    if _group_ready():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the processes (every process passes the same keys)."""
    if not _group_ready():
        return values
    import torch

    keys = sorted(values)
    summed = sum_over_processes(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, summed.tolist(), strict=True)}


def wrap_for_processes(module):
    """`module` wrapped for DDP by accelerate when several processes run (its gradients are then
    averaged over them at each backward); the module itself in one process."""
    if not _group_ready():
        return module
    from accelerate import Accelerator

    return Accelerator(device_placement=False).prepare_model(module)


def gather(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order, in every process ([value] in one)."""
    if not _group_ready():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


@contextmanager
def main_first() -> Iterator[bool]:
    """The main process runs the block first (e.g. writes a cache), then the others (reading it);
    yields whether this is the main process."""
    if not is_main():
        barrier()
    try:
        yield is_main()
    finally:
        if is_main():
            barrier()


def launch_command(
    nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int, train_args: list[str]
) -> list[str]:
    """torch's elastic launcher running `python -m lmforge train TRAIN_ARGS` in `nproc` processes
    per machine: on one machine with a free port of its own choosing (--standalone), on several at
    machine 0's address and port."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={master_port}",
        ]
    return [*command, "-m", "lmforge", "train", *train_args]
