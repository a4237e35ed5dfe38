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


def small_generation(base_dir, alpaca_file, output_dir, limit: int, max_new_tokens: int) -> dict:
    return {
        "output_dir": str(output_dir),
        "models": [{"name": "tiny", "path": str(base_dir), "template": "chatml"}],
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": 8},
        "tasks": [
            {"kind": "generation", "data": str(alpaca_file), "limit": limit, "metrics": ["exact_match"]}
        ],
    }


def test_predictions_are_regenerated_when_settings_change(base_dir, alpaca_file, tmp_path) -> None:
    predictions = tmp_path / "eval" / "tiny" / "generation" / "predictions.jsonl"

    def rows():
        return [json.loads(line) for line in predictions.read_text().splitlines()]

    evaluate(
        validate_eval_config(small_generation(base_dir, alpaca_file, tmp_path / "eval", 6, 2)), quiet=True
    )
    assert len(rows()) == 6 and max(r["completion_tokens"] for r in rows()) <= 2
    result = evaluate(
        validate_eval_config(small_generation(base_dir, alpaca_file, tmp_path / "eval", 3, 7)), quiet=True
    )
    assert len(rows()) == 3  # not the 6 old rows resumed
    assert max(r["completion_tokens"] for r in rows()) > 2  # generated again with the new setting
    assert result.results["tiny"]["generation"]["items"] == 3


def test_a_changed_input_file_changes_the_fingerprint(tmp_path) -> None:
    data = tmp_path / "data.json"
    data.write_text("[1]")
    before = runner.fingerprint(str(data))
    data.write_text("[1, 2]")
    assert runner.fingerprint(str(data)) != before
    assert runner.fingerprint("org/some-hub-model") == ["org/some-hub-model"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert runner.fingerprint("model", base=str(tmp_path))[0][0] == "config.json"  # relative to dataset_dir


def test_names_that_would_share_a_folder_or_column_are_refused(tmp_path) -> None:
    two = {"tasks": [{"kind": "suite"}], "output_dir": str(tmp_path)}
    clash = validate_eval_config(
        {**two, "models": [{"name": "sft/final", "path": "a"}, {"name": "sft_final", "path": "b"}]}
    )
    with pytest.raises(ValueError, match="share a folder name"):
        evaluate(clash, quiet=True)
    escape = validate_eval_config({**two, "models": [{"name": "..", "path": "a"}]})
    assert runner.slug(escape.models[0].name) == "model"  # never a folder outside output_dir
    (tmp_path / "base.jsonl").write_text(json.dumps({"output": "a", "reference": "a"}) + "\n")
    column = validate_eval_config(
        {
            "output_dir": str(tmp_path),
            "models": [{"name": "base", "path": "a"}],
            "tasks": [{"kind": "generation", "predictions": str(tmp_path / "base.jsonl")}],
        }
    )
    with pytest.raises(ValueError, match="share the report column `base`"):
        evaluate(column, quiet=True)


def test_records_without_a_reference_are_refused_before_generating(base_dir, tmp_path) -> None:
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"prompt": "add 1 and 2"}]))
    config = validate_eval_config(
        {
            "output_dir": str(tmp_path / "eval"),
            "models": [{"path": str(base_dir), "template": "chatml"}],
            "tasks": [{"kind": "reasoning", "data": str(data)}],
        }
    )
    with pytest.raises(
        ValueError, match=r"prompts.json: record 0: no reference answer .* for task reasoning"
    ):
        evaluate(config, quiet=True)
