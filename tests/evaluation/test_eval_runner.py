"""`lmforge eval` end to end: the quickstart's stages compared in one report; results reused."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.config.loader import validate_eval_config
from lmforge.evaluation import benchmarks, runner
from lmforge.evaluation.runner import evaluate
from lmforge.evaluation.suite import quickstart_suite


def quickstart_eval(out, mmlu_root, output_dir) -> dict:
    heldout = str(out / "data" / "heldout.json")
    base = str(out / "pretrain" / "model")
    return {
        "output_dir": str(output_dir),
        "models": [
            {"name": "base", "path": base, "template": "chatml"},
            {"name": "sft", "path": base, "adapter": str(out / "sft" / "adapter")},
        ],
        "generation": {"max_new_tokens": 10, "batch_size": 50},
        "tasks": [
            {"kind": "perplexity", "data": heldout, "limit": 100},
            {"kind": "generation", "data": heldout, "limit": 100},
            {"kind": "reasoning", "data": heldout, "limit": 50},
            {"kind": "suite", "suite": "quickstart"},
            {"kind": "multiple_choice", "benchmark": "mmlu", "path": str(mmlu_root), "shots": 1, "limit": 2},
        ],
    }


@pytest.mark.xdist_group("quickstart")
def test_quickstart_stages_compared(quickstart_run, tmp_path, monkeypatch) -> None:
    out, _ = quickstart_run
    torch.set_num_threads(2)
    mmlu_root = benchmarks.write_fixture("mmlu", tmp_path / "mmlu", {"astronomy": 2, "sociology": 2})
    config = quickstart_eval(out, mmlu_root, tmp_path / "eval")
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    base, sft = saved["base"], saved["sft"]

    # the SFT checkpoint beats the base on the synthetic task, by every measure
    assert sft["generation"]["exact_match"] >= base["generation"]["exact_match"] + 0.5
    assert sft["reasoning"]["accuracy"] >= base["reasoning"]["accuracy"] + 0.5
    assert sft["perplexity"]["perplexity"] < base["perplexity"]["perplexity"] / 5
    assert sft["suite"]["pass_rate"] > base["suite"]["pass_rate"]
    assert sft["suite"]["per_category"]["reasoning"]["pass_rate"] >= 0.5
    assert sft["multiple_choice"]["questions"] == 4  # 2 per subject
    assert set(sft["multiple_choice"]["per_category"]) == {"STEM", "social sciences"}

    report = (tmp_path / "eval" / "results.md").read_text()
    assert "| metric | base | sft |" in report
    assert "**base → sft**: newly passed" in report
    assert "Answers side by side" in report and "Failures of base" in report
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # one plot per task
    assert (tmp_path / "eval" / "plots" / "suite.png").stat().st_size > 1000
    rows = (tmp_path / "eval" / "sft" / "suite" / "details.jsonl").read_text().splitlines()
    assert len(rows) == len(quickstart_suite())
    assert {"id", "prompt", "output", "passed"} <= set(json.loads(rows[0]))

    # a rerun reuses every saved result; a changed generation setting recomputes only generating tasks
    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed a saved result")

    monkeypatch.setattr(runner, "run_task", must_not_run)
    again = evaluate(validate_eval_config(config), quiet=True)
    assert again.results == saved
    ran = []
    monkeypatch.setattr(
        runner, "run_task", lambda engine, model, task, *a: ran.append((model.name, task.name)) or ({}, None)
    )
    monkeypatch.setattr(runner, "_load", lambda model, quiet: None)
    monkeypatch.setattr(runner, "_write_results", lambda *a: None)
    config["generation"]["max_new_tokens"] = 11
    evaluate(validate_eval_config(config), quiet=True)
    assert sorted(ran) == sorted(
        (m, t) for m in ("base", "sft") for t in ("generation", "reasoning", "suite")
    )


def test_scoring_predictions_without_a_model(tmp_path) -> None:
    predictions = tmp_path / "dpo_predictions.jsonl"
    rows = [
        {"index": 0, "output": "Paris", "reference": "Paris"},
        {"index": 1, "output": "the cat sat", "reference": "the cat sat on the mat"},
    ]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_eval_config(
        {
            "output_dir": str(tmp_path / "eval"),
            "tasks": [
                {"kind": "generation", "predictions": str(predictions), "metrics": ["exact_match", "rouge"]}
            ],
        }
    )
    result = evaluate(config, quiet=True)
    metrics = result.results["dpo_predictions"]["generation"]
    assert metrics["exact_match"] == 0.5
    assert metrics["rouge1"] == pytest.approx((1 + 2 * 1 * 0.5 / 1.5) / 2)  # "the cat sat": P 1, R 3/6
    assert "dpo_predictions" in (tmp_path / "eval" / "results.md").read_text()


def test_a_result_from_other_settings_is_not_reused(tmp_path) -> None:
    runner._save(tmp_path, "key-a", {"accuracy": 0.5}, [{"x": 1}])
    assert runner._cached(tmp_path, "key-a") == {"accuracy": 0.5}
    assert runner._cached(tmp_path, "key-b") is None
    assert json.loads((tmp_path / "details.jsonl").read_text()) == {"x": 1}
    assert not list(tmp_path.glob("*.tmp"))  # written then renamed
