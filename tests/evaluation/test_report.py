"""The eval report: per-subject accuracy in results.md and report.html, harness tables without
`sample_len`, perplexity plots on a log axis, legends that cover no bar."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from lmforge.config.loader import validate_eval_config
from lmforge.evaluation.report import draw_task, write_report

CHOICE = {
    "accuracy": 0.5,
    "subject_macro": 0.5,
    "questions": 4,
    "fewer_shots": 2,
    "cropped": 1,
    "no_letter": 0.25,
    "per_category": {"STEM": 0.5, "humanities": 0.5},
    "per_subject": {"astronomy": 0.5, "philosophy": 0.5},
}
RESULTS = {
    "base": {
        "mmlu": CHOICE,
        "perplexity": {"perplexity": 106.0, "nll": 4.66},
        "harness": {"hellaswag": {"acc": 0.25, "sample_len": 40}},
    },
    "sft": {
        "mmlu": {**CHOICE, "per_subject": {"astronomy": 0.75, "philosophy": 0.25}},
        "perplexity": {"perplexity": 1.93, "nll": 0.66},
        "harness": {"hellaswag": {"acc": 0.5, "sample_len": 40}},
    },
}


@pytest.fixture
def config(tmp_path):
    return validate_eval_config(
        {
            "output_dir": str(tmp_path),
            "models": [{"name": "base", "path": "b"}, {"name": "sft", "path": "s"}],
            "tasks": [
                {
                    "kind": "multiple_choice",
                    "name": "mmlu",
                    "benchmark": "mmlu",
                    "path": "m",
                    "scoring": "generate",
                },
                {"kind": "perplexity", "data": "d.json"},
                {"kind": "harness", "tasks": ["hellaswag"]},
            ],
        }
    )


def test_subject_scores_and_fitting_counts_are_in_markdown_and_html(config, tmp_path) -> None:
    md_path, html_path = write_report(config, RESULTS, tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "| subject (category) | base | sft |" in md
    assert "| astronomy (STEM) | 0.500 | 0.750 (+0.250 ▲) |" in md
    assert "| philosophy (humanities) | 0.500 | 0.250 (−0.250 ▼) |" in md
    assert "<td>astronomy (STEM)</td><td>0.500</td><td>0.750 (+0.250 ▲)</td>" in page
    assert "| no letter (generate) | 0.250 | 0.250 |" in md
    assert "| cropped questions | 1 | 1 |" in md and "| fewer shots | 2 | 2 |" in md
    assert "| hellaswag acc | 0.250 | 0.500 (+0.250 ▲) |" in md
    assert "sample_len" not in md and "sample_len" not in page


def test_perplexity_is_drawn_on_a_log_axis(config) -> None:
    fig = draw_task(RESULTS, config.tasks[1])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [round(p.get_height(), 2) for p in ax.patches] == [106.0, 1.93]
    plt.close(fig)


@pytest.mark.parametrize("task", [0, 1])
def test_the_legend_sits_outside_the_axes_and_covers_no_bar(config, task) -> None:
    fig = draw_task(RESULTS, config.tasks[task])
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # right of the plotting area
    assert fig.bbox.x1 >= legend.x1 and fig.bbox.y1 >= legend.y1  # and inside the saved image
    assert ax.patches and not any(legend.overlaps(p.get_window_extent()) for p in ax.patches)
    plt.close(fig)
