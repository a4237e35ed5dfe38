"""`lmforge quickstart` end to end, then the shipped example config trained on what it wrote.

The pipeline is the expensive part (about a minute): it runs once, in the session fixture
`quickstart_run`, on the worker of the xdist group `quickstart`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
pytestmark = pytest.mark.xdist_group("quickstart")


def losses(metrics: Path) -> list[float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_quickstart_learns_merges_chats_and_feeds_the_example_config(tmp_path, quickstart_run):
    out, output = quickstart_run
    assert "Loading weights" not in output and "Map:" not in output  # only lmforge's bars

    results = json.loads((out / "results.json").read_text())
    assert results["heldout"] >= 100
    assert results["accuracy_after"] - results["accuracy_before"] >= 0.40
    # DPO keeps what SFT taught; merging changes no answer: the merged model is the DPO adapter model
    assert results["accuracy_dpo"] >= results["accuracy_after"] - 0.05
    assert results["accuracy_merged"] == results["accuracy_dpo"]
    assert results["chat_answer"] == results["expected_answer"]
    assert "held-out exact match" in output  # the results table

    train = {r["instruction"] for r in json.loads((out / "data" / "sft_train.json").read_text())}
    heldout = {r["instruction"] for r in json.loads((out / "data" / "heldout.json").read_text())}
    assert not train & heldout
    for weights in ("base", "pretrain/model", "merged"):
        assert (out / weights / "model.safetensors").exists(), weights
    for adapter in ("sft", "dpo"):
        assert (out / adapter / "adapter" / "adapter_model.safetensors").exists(), adapter

    # it ran as a pipeline: manifest, report, and a rerun would skip every stage
    from lmforge.pipeline.runner import load_manifest, plan
    from lmforge.pipeline.spec import load_pipeline

    spec = load_pipeline(out / "pipeline.yaml")
    manifest = load_manifest(spec)
    assert [manifest["stages"][s]["status"] for s in ("pretrain", "sft", "dpo", "merged", "eval")] == [
        "done"
    ] * 5
    assert {s.action for s in plan(spec, manifest)} == {"skip"}
    for header in ("pretrain (pretrain)", "sft (sft)", "dpo (dpo)", "merged (merge)", "eval (eval)"):
        assert f"{header} — new" in output  # a first run's stage headers
    assert "runs again" not in output
    assert "Loss curves" in (out / "report.md").read_text()
    assert (out / "eval" / "report.html").is_file()
    assert (out / "merged" / "lmforge_template.txt").read_text().strip() == "chatml"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.tmp"))

    # The shipped example trains on the quickstart's outputs, with command-line overrides.
    example = tmp_path / "example"
    result = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "examples" / "quickstart" / "sft.yaml"),
            f"model.name_or_path={out / 'pretrain' / 'model'}",
            f"data.path={out / 'data' / 'sft_train.json'}",
            f"train.output_dir={example}",
            "train.max_steps=40",
            "train.save_steps=20",
            "train.progress=false",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (example / "adapter" / "adapter_model.safetensors").exists()
    curve = losses(example / "metrics.jsonl")
    assert curve[-1] < 0.5 * curve[0]
