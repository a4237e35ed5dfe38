"""The pipeline report shows each eval stage's tables, multiple choice with every subject's accuracy."""

from __future__ import annotations

from lmforge.pipeline.report import write_pipeline_report
from lmforge.pipeline.spec import parse_pipeline

MMLU = {"kind": "multiple_choice", "name": "mmlu", "benchmark": "mmlu", "path": "mmlu"}
METRICS = {
    "accuracy": 0.5,
    "subject_macro": 0.5,
    "questions": 4,
    "per_category": {"STEM": 0.75, "humanities": 0.25},
    "per_subject": {"astronomy": 0.75, "philosophy": 0.25},
}


def test_an_eval_stage_lists_its_subjects(tmp_path) -> None:
    raw = {
        "output_dir": str(tmp_path),
        "shared": {"model": {"name_or_path": "m"}},
        "stages": [
            {"name": "sft", "kind": "sft", "data": {"path": "d.json"}},
            {"name": "eval", "kind": "eval", "models": ["sft"], "tasks": [MMLU]},
        ],
    }
    config = {"output_dir": str(tmp_path / "eval"), "models": [{"name": "sft", "path": "m"}], "tasks": [MMLU]}
    manifest = {
        "stages": {"eval": {"status": "done", "config": config, "metrics": {"sft": {"mmlu": METRICS}}}}
    }
    md_path, html_path = write_pipeline_report(parse_pipeline(raw), manifest)
    assert "| astronomy (STEM) | 0.750 |" in md_path.read_text()
    assert "<td>philosophy (humanities)</td><td>0.250</td>" in html_path.read_text()
