"""Helpers shared by tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path


def addition_records(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"instruction": f"add {a} and {b}", "input": "", "output": str(a + b)} for a, b in pairs]


def sft_config(base_dir: Path, data: Path, output_dir: Path, **train) -> dict:
    """A small SFT config as a dict (validated by the caller)."""
    return {
        "model": {"name_or_path": str(base_dir)},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 8,
            "batch_size": 4,
            "lr": 1e-3,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }
