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
