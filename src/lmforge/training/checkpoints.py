"""Checkpoints: find the one to resume from (only those marked complete count), and write and
read the checkpoints of the loop lmforge runs itself (PPO's; trainer stages use the Trainer's)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.artifacts import atomic_folder
from lmforge.training.callbacks import COMPLETE_MARKER, mark_complete

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str) -> str | None:
    """`none` -> None; `auto` -> latest complete checkpoint (or None); a path -> that path, checked."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint {path} does not exist")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"train.resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER}: the run was "
            "interrupted while saving it); use train.resume=auto to take the latest complete one"
        )
    return str(path)


def save_loop_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    limit: int,
) -> Path:
    """checkpoint-`step`/ of a loop lmforge runs itself (PPO's): each of `weights` as NAME.safetensors,
    optimizer and scheduler states, torch's and Python's RNGs and the loop's JSON `state`; written
    in a temporary folder, renamed, then marked complete. Keeps the newest `limit` (0: all)."""
    final = Path(output_dir) / f"checkpoint-{step}"
    with atomic_folder(final) as folder:
        for name, tensors in weights.items():
            save_file(tensors, str(folder / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(torch.get_rng_state(), folder / "rng.pt")
        (folder / "loop.json").write_text(
            json.dumps({**state, "python_rng": random.getstate()}), encoding="utf-8"
        )
    mark_complete(final, step)
    if limit:
        for old in complete_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)
    return final


def load_loop_checkpoint(
    checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, scheduler
) -> dict:
    """Restore what `save_loop_checkpoint` wrote into `modules` (by name), the optimizer, the
    scheduler and the RNGs; returns the loop's state."""
    for name, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in load_file(str(checkpoint / f"{name}.safetensors")).items():
            params[key].data.copy_(value)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True))
    state = json.loads((checkpoint / "loop.json").read_text(encoding="utf-8"))
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
