"""Find the checkpoint to resume from. Only checkpoints marked complete count."""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.training.callbacks import COMPLETE_MARKER

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
