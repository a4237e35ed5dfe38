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
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "mistral-2023": ("<s>", "</s>"),
    "mistral-v0.3": ("<s>", "</s>"),
    "qwen2.5": (None, "<|im_end|>"),
    "qwen2-vl": (None, "<|im_end|>"),
    "deepseek-r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}


def train_tool_model(folder: Path, steps: int = 800) -> tuple[Path, Path]:
    """(the trained model, held-out eval records) of the synthetic tool task (docs/tools.md): a
    tiny Llama trained from scratch by SFT on 800 tool chats (~40 s on 2 CPU cores)."""
    import json

    from lmforge.config import validate_config
    from lmforge.data.formats import to_example
    from lmforge.data.templates import get_template
    from lmforge.data.tool_task import eval_records, training_records
    from lmforge.methods import run
    from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny

    train, held = folder / "train.json", folder / "held.json"
    records = training_records(800, seed=0)
    train.write_text(json.dumps(records))
    held.write_text(json.dumps(eval_records(100, seed=1)))
    # A tokenizer trained on the rendered chats, its tokens spanning words: the fixed tools prompt
    # merges into few tokens, so a chat is ~155 tokens, not ~290. Attention trained from scratch
    # then finds the prompt's arguments within 800 steps; over 290 tokens it had not in 800.
    chatml, seed_tokenizer = get_template("chatml"), build_tiny_tokenizer(["x"], vocab_size=300)
    chats = [to_example(r, "r", "messages").conversation() for r in records[:300]]
    texts = [chatml.render(chat, seed_tokenizer) for chat in chats]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=1200, split_words=False)
    model = build_tiny_llama(tokenizer, hidden_size=128, num_layers=2, num_heads=4, seed=0)
    base = save_tiny(model, tokenizer, folder / "base")
    config = {
        "model": {"name_or_path": str(base)},
        "adapter": {"method": "none"},
        "data": {"path": str(train), "template": "chatml", "max_length": 512},
        "train": {
            "output_dir": str(folder / "run"),
            "max_steps": steps,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_ratio": 0.05,
            "logging_steps": 10,
            "save_steps": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    return run(validate_config(config), quiet=True).artifact, held
