"""Shared fixtures: a tiny tokenizer and Llama built offline, and small data sets."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import addition_records
from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny

# The tokenized-data cache (data.cache) of this test process, never the user's ~/.cache/lmforge.
os.environ["LMFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmforge-test-cache-")

WORDS = "the cat sat on a mat and dog ran to hat red blue green add sum of is what".split()


def corpus() -> list[str]:
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(200)]
    lines += [f"add {a} and {b} is {a + b}" for a in range(10) for b in range(10)]
    lines += ["Hello! How are you? I am fine, thanks.", "<think>\nreason\n</think>\n\nanswer"]
    return lines


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer(corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=0), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "add.json"
    path.write_text(json.dumps(addition_records([(a, b) for a in range(10) for b in range(10)])))
    return path


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL with its tokenizer and image processor, saved like a hub folder."""
    from lmforge.data.shapes import COLOURS, SHAPES
    from lmforge.models.tiny import build_tiny_qwen2_vl, save_tiny_vlm

    words = [*COLOURS, *SHAPES, "What colour is the shape? What shape is it?"]
    tokenizer = build_tiny_tokenizer([*corpus(), *words], vocab_size=360)
    return save_tiny_vlm(build_tiny_qwen2_vl(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def shapes_file(tmp_path_factory) -> Path:
    """24 image-text records of the shapes task (images/ beside data.json)."""
    from lmforge.data.shapes import write_shapes_task

    return write_shapes_task(tmp_path_factory.mktemp("shapes"), 24)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """`lmforge quickstart` run once: (output folder, CLI output). Tests that use it are in the
    xdist group `quickstart`, so one worker runs it once (about a minute on both cores)."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("quickstart-run") / "quickstart"
    result = CliRunner().invoke(app, ["quickstart", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="session")
def quickstart_sft(quickstart_run, tmp_path_factory) -> Path:
    """A partly trained LoRA SFT adapter on the quickstart model (about a quarter of held-out prompts
    right): the start of the preference and RL learning tests (group `quickstart` too)."""
    from lmforge.config import validate_config
    from lmforge.methods import sft

    out, _ = quickstart_run
    config = {
        "model": {"name_or_path": str(out / "pretrain" / "model")},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(out / "data" / "sft_train.json"), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(tmp_path_factory.mktemp("quickstart-sft")),
            "max_steps": 30,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            "progress": False,
            "tensorboard": False,
        },
    }
    torch.set_num_threads(2)
    return sft.run(validate_config(config), quiet=True).artifact


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory) -> tuple[Path, Path]:
    """(model, held-out eval records) of the synthetic tool task, trained once per session (its
    tests share the `quickstart` xdist group, so one worker trains it)."""
    from helpers import train_tool_model

    return train_tool_model(tmp_path_factory.mktemp("tool-model"))
