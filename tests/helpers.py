"""Helpers shared by tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def serving(app) -> Iterator[str]:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    for _ in range(200):
        if running.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(timeout=10)


def http(
    method: str, url: str, body: bytes | dict | None = None, key: str | None = "test-key"
) -> tuple[int, str]:
    """(status, text) of a raw request (no client library between the test and the server)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# Pre-tokenizers as the hub's tokenizer.json files write them: GPT-2's and Llama-3's (whose regex
# Qwen2 shares but for single digits).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
LLAMA3_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}


def with_pre_tokenizer(base_dir: Path, path: Path, pre_tokenizer: dict) -> Path:
    """A copy of the tiny model whose tokenizer.json has `pre_tokenizer` (vocabulary and merges kept)."""
    import shutil

    model_dir = shutil.copytree(base_dir, path)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = pre_tokenizer
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return model_dir


# The official chat templates (tests/data/chat_templates, sources in SOURCES.md) and the BOS/EOS
# strings of each model's real tokenizer.
OFFICIAL_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
OFFICIAL_SPECIAL = {
    "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "mistral-2023": ("<s>", "</s>"),
    "qwen2.5": (None, "<|im_end|>"),
    "qwen2-vl": (None, "<|im_end|>"),
    "deepseek-r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
