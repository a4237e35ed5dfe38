"""Where a model is: a local folder or a hub id (imported by both hardware probing and loading)."""

from __future__ import annotations

from pathlib import Path


def model_location(name_or_path: str) -> str:
    """A local folder, or a hub id; a path-like name that does not exist is one clear error
    (instead of the hub client's complaint about repo id syntax)."""
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise OSError(
            f"model folder {name_or_path} does not exist; check model.name_or_path (a local folder, "
            "or a hub id like Qwen/Qwen2.5-0.5B-Instruct)"
        )
    return name_or_path
