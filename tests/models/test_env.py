"""`lmforge env`: versions, devices and the optional speedups, each usable or not with its reason."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.models.env import SPEEDUPS, check_speedups, gather_env

runner = CliRunner()
NAMES = [name for name, _, _ in SPEEDUPS]


def statuses(installed: set[str], capabilities, import_error=lambda module: None) -> dict:
    found = check_speedups(lambda module: module in installed, capabilities, import_error)
    return {s.name: (s.usable, s.reason) for s in found}


def test_each_speedup_says_why():
    every = {module for _, _, module in SPEEDUPS}
    none = statuses(set(), [(9, 0)])
    assert all(
        not usable and reason.startswith("not installed (pip install ") for usable, reason in none.values()
    )
    no_gpu = statuses(every, [])
    assert all(not usable and reason == "no CUDA GPU" for usable, reason in no_gpu.values())
    turing = statuses(every, [(7, 5)])
    assert turing["flash-attn"] == (False, "needs compute capability 8.0+ (Ampere or newer); the GPU has 7.5")
    assert all(turing[name][0] for name in NAMES if name != "flash-attn")  # they run on Turing
    assert all(reason.startswith("ok (") for usable, reason in turing.values() if usable)
    broken = statuses(every, [(8, 0)], lambda module: "ImportError: undefined symbol")
    assert broken["flash-attn"][0] is False and "does not import (ImportError" in broken["flash-attn"][1]
    assert all(usable for usable, _ in statuses(every, [(7, 5), (9, 0)]).values())


def test_gather_reports_this_machine():
    report = gather_env()
    assert report.versions["torch"] == torch.__version__
    assert set(report.versions) >= {"lmforge", "transformers", "trl", "peft", "accelerate", "datasets"}
    kinds = [device.kind for device in report.devices]
    assert kinds[-1] == "cpu" and kinds.count("cuda") == torch.cuda.device_count()
    assert [s.name for s in report.speedups] == NAMES
    if not torch.cuda.is_available():
        assert all(not s.usable for s in report.speedups)


def test_env_command_prints_tables():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    for fragment in ("torch", torch.__version__, "devices", "cpu", "optional speedups", *NAMES):
        assert fragment in result.output, fragment


def test_env_json_parses():
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] == torch.__version__
    assert report["devices"][-1]["kind"] == "cpu" and report["devices"][-1]["memory_gb"] != 0
    assert {s["name"] for s in report["speedups"]} == set(NAMES)
    for speedup in report["speedups"]:
        assert isinstance(speedup["usable"], bool) and speedup["reason"]
